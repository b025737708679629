"""``lit-rlhf export``: merge a trained LoRA adapter into its base model for plain ``transformers`` use."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

from lit_rlhf.errors import ConfigError
from lit_rlhf.models import DType, load_causal_lm, load_tokenizer

VALUE_HEAD_FILE = "value_head.safetensors"


def export_policy(
    output_dir: str, adapter_dir: Optional[str] = None, checkpoint: Optional[str] = None,
    base_model: Optional[str] = None, dtype: DType = "float32", trust_remote_code: bool = False,
) -> Path:
    """Merge the adapter of a run into its base model and save model, tokenizer and value head.

    Args:
        output_dir: Where to write the merged checkpoint (loadable with ``AutoModelForCausalLM``).
        adapter_dir: The ``policy/`` folder a run writes (peft adapter, value head, tokenizer).
        checkpoint: Instead of ``adapter_dir``: a run's ``.ckpt`` file (e.g. ``checkpoints/last.ckpt`` of a run
            that stopped early); its recipe (stored in it) says which base model and LoRA settings to use.
        base_model: Base checkpoint to merge into; by default the one the adapter or checkpoint records.
        dtype: Dtype of the merged weights.
        trust_remote_code: Allow the base checkpoint's own modelling code to run.
    """
    if (adapter_dir is None) == (checkpoint is None):
        raise ConfigError("export: give exactly one of --adapter_dir (a run's policy/ folder) and --checkpoint (a .ckpt)")
    with tempfile.TemporaryDirectory() as scratch:
        if checkpoint is not None:
            adapter_dir = str(adapter_from_checkpoint(checkpoint, Path(scratch) / "policy"))
        adapter = Path(adapter_dir)
        if not (adapter / "adapter_config.json").is_file():
            raise ConfigError(
                f"adapter_dir={adapter_dir!r} holds no adapter_config.json: give the policy/ folder of a run"
            )
        output = merge_adapter(adapter, output_dir, base_model, dtype, trust_remote_code)
        if (adapter / VALUE_HEAD_FILE).is_file():
            shutil.copy(adapter / VALUE_HEAD_FILE, output / VALUE_HEAD_FILE)
    print(f"Merged model written to {output}")
    return output


def merge_adapter(
    adapter_dir: str | Path, output_dir: str | Path, base_model: Optional[str] = None, dtype: DType = "float32",
    trust_remote_code: bool = False, sequence_classification: bool = False,
) -> Path:
    """Load the adapter's base model in ``dtype`` (never quantized), merge the adapter into it and save model and
    tokenizer to ``output_dir``: a plain ``transformers`` checkpoint (a causal LM, or a one-label sequence
    classifier for a reward model, with its trained score head)."""
    from peft import PeftConfig, PeftModel

    adapter = Path(adapter_dir)
    base_path = base_model or PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    if sequence_classification:
        from lit_rlhf.reward_modeling import load_sequence_classifier

        base = load_sequence_classifier(base_path, dtype, trust_remote_code, tokenizer_dir=str(adapter))
    else:
        base = load_causal_lm(base_path, dtype, trust_remote_code, field_name="base_model")
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    output = Path(output_dir)
    merged.save_pretrained(output)
    tokenizer_source = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base_path
    load_tokenizer(tokenizer_source, trust_remote_code).save_pretrained(output)
    return output


def adapter_from_checkpoint(checkpoint: str, directory: Path) -> Path:
    """Rebuild a run's ``policy/`` folder (peft adapter, value head, tokenizer) from its ``.ckpt`` file."""
    import torch

    from lit_rlhf.models import PolicyConfig, load_policy

    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(
            f"checkpoint={checkpoint!r} is not a checkpoint file (a sharded checkpoint folder cannot be exported "
            "directly: resume it with save_distributed_checkpoint=false, or export the run's policy/ folder)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    recipe = state.get("hyper_parameters", {}).get("policy")
    if recipe is None or "state_dict" not in state:
        raise ConfigError(f"checkpoint={checkpoint!r} was not written by lit-rlhf fit: it holds no policy recipe")
    config = PolicyConfig(**{**recipe, "quantization": None})  # merge into full-precision weights
    policy = load_policy(config)
    prefix = "policy."
    weights = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    missing = [name for name, p in policy.named_parameters() if p.requires_grad and name not in weights]
    if missing:
        raise ConfigError(f"checkpoint={checkpoint!r} lacks trained weights of its own recipe, e.g. {missing[:3]}")
    policy.load_state_dict(weights, strict=False)
    policy.save_pretrained(directory)
    load_tokenizer(config.model_name_or_path, config.trust_remote_code).save_pretrained(directory)
    return directory
