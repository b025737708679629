"""``lit-rlhf export``: merge a trained LoRA adapter into its base model for plain ``transformers`` use."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from lit_rlhf.models import DType, load_causal_lm, load_tokenizer

VALUE_HEAD_FILE = "value_head.safetensors"


def export_policy(
    adapter_dir: str, output_dir: str, base_model: Optional[str] = None, dtype: DType = "float32",
    trust_remote_code: bool = False,
) -> Path:
    """Merge the adapter of a run into its base model and save model, tokenizer and value head.

    Args:
        adapter_dir: The ``policy/`` folder a run writes (peft adapter, value head, tokenizer).
        output_dir: Where to write the merged checkpoint (loadable with ``AutoModelForCausalLM``).
        base_model: Base checkpoint to merge into; by default the one recorded in the adapter's config.
        dtype: Dtype of the merged weights.
        trust_remote_code: Allow the base checkpoint's own modelling code to run.
    """
    from peft import PeftConfig, PeftModel

    adapter = Path(adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"adapter_dir={adapter_dir!r} holds no adapter_config.json: give the policy/ folder of a run")
    base_path = base_model or PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    base = load_causal_lm(base_path, dtype, trust_remote_code, field_name="base_model")
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    output = Path(output_dir)
    merged.save_pretrained(output)
    tokenizer_source = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base_path
    load_tokenizer(tokenizer_source, trust_remote_code).save_pretrained(output)
    if (adapter / VALUE_HEAD_FILE).is_file():
        shutil.copy(adapter / VALUE_HEAD_FILE, output / VALUE_HEAD_FILE)
    print(f"Merged model written to {output}")
    return output
