"""Tiny, randomly initialized Hugging Face checkpoints built locally, for offline runs and tests; and where every
``model_name_or_path`` is turned into a loadable folder (built-ins, GGUF files: :func:`resolve_model_path`).

``builtin:tiny-<arch>`` (a causal LM) and ``builtin:tiny-<arch>-classifier`` (a one-label sequence
classifier) name checkpoints that are built from a config on first use, saved with ``save_pretrained``
into a cache folder and then loaded like any other local checkpoint with ``from_pretrained``. Their
word-level tokenizer is built from the vocabulary below, so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import safetensors.torch
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerFast,
)

from lit_rlhf.errors import ConfigError
from lit_rlhf.rewards import NEGATIVE_WORDS, POSITIVE_WORDS

BUILTIN_PREFIX = "builtin:"
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
NEUTRAL_WORDS = (
    "the a an this that it is was be are were has had have and or but so then very really quite "
    "movie film book song meal food place trip day night story show game plot actor music scene "
    "i you we they he she my your our their me us them of to in on at for with about from by as "
    "not just also still even more most some any every one two three first last next other "
    "made felt looked seemed sounded tasted went came saw heard read watched played ate said "
    "thought found gave took got kept left put ran set told tried used worked wrote "
    "time year way thing people man woman child world life hand part place case week point "
    "home room house city street car road train bus plane hotel table chair door window "
    "water coffee tea bread cake pizza soup salad rice fish meat fruit "
    "morning evening weekend summer winter spring autumn today tomorrow yesterday "
    "there here when where why how what who which while after before during until "
    "end start middle side top bottom front back inside outside"
).split()
# Tiny backbones per architecture: small enough that a PPO step takes milliseconds on a CPU.
_TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
# One per family of the default LoRA target table (models.DEFAULT_LORA_TARGETS). Gemma 2/3 and Granite get
# strong logit transforms (soft-capping, scaling), so tests notice log-probs that would skip them. Heads are
# 32 wide, the smallest vLLM's CPU attention takes (generation.engine: vllm runs the built-in models too).
_ARCH_OVERRIDES = {
    "llama": dict(num_key_value_heads=1),
    "qwen2": dict(num_key_value_heads=1),
    "qwen3": dict(num_key_value_heads=1, head_dim=32),
    "mistral": dict(num_key_value_heads=1, sliding_window=None),
    "mixtral": dict(num_key_value_heads=1, sliding_window=None, num_local_experts=4, num_experts_per_tok=2),
    "gemma": dict(num_key_value_heads=1, head_dim=32),
    "gemma2": dict(num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, final_logit_softcapping=3.0),
    "gemma3_text": dict(num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, final_logit_softcapping=3.0),
    "olmo2": dict(num_key_value_heads=1),
    "granite": dict(num_key_value_heads=1, logits_scaling=4.0),
    "phi3": dict(num_key_value_heads=1),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=2, n_inner=128, n_positions=256),
    "gpt_neox": dict(),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "falcon": dict(),
}
# A larger init than the usual 0.02 gives peaked, LM-like next-token distributions that LoRA can reshape.
INIT_STD = 0.2
_BUILD_VERSION = "v3"  # bump when the builder changes, so stale cached checkpoints are rebuilt


def vocabulary() -> list[str]:
    """The tiny tokenizer's words: special tokens, neutral words, then the sentiment lexicon."""
    words = list(SPECIAL_TOKENS)
    for word in NEUTRAL_WORDS + POSITIVE_WORDS + NEGATIVE_WORDS:
        if word not in words:
            words.append(word)
    return words


def build_word_tokenizer(
    pad_token: Optional[str] = "<pad>", words: Optional[list[str]] = None
) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` (default :func:`vocabulary`; the special tokens
    come first), with a trivial chat template."""
    words = vocabulary() if words is None else words
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", pad_token=pad_token
    )
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
    return tokenizer


def tiny_config(arch: str, num_labels: Optional[int] = None):
    """A ``transformers`` config of a tiny ``arch`` model sized for the word tokenizer."""
    if arch not in _ARCH_OVERRIDES:
        raise ConfigError(f"No tiny builder for architecture {arch!r}; choose one of {sorted(_ARCH_OVERRIDES)}")
    sizes = {} if arch == "gpt2" else dict(_TINY_SIZES, max_position_embeddings=256)
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(vocabulary()),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
        initializer_range=INIT_STD,
        **sizes,
        **_ARCH_OVERRIDES[arch],
    )
    if num_labels is not None:
        config.num_labels = num_labels
    return config


def save_tiny_checkpoint(
    path: str | os.PathLike, arch: str = "llama", classifier: bool = False, seed: int = 0,
    num_labels: int = 1, pad_token: Optional[str] = "<pad>",
) -> Path:
    """Build a tiny random ``arch`` model (causal LM or classifier) and its tokenizer; save both."""
    path = Path(path)
    with torch.random.fork_rng(devices=[]):  # a run that builds its model first must sample as one that does not
        torch.manual_seed(seed)
        if classifier:
            model = AutoModelForSequenceClassification.from_config(tiny_config(arch, num_labels=num_labels))
        else:
            model = AutoModelForCausalLM.from_config(tiny_config(arch))
    # The files model.save_pretrained would write, written directly: under torch.distributed it writes
    # nothing on ranks other than 0, which would leave a checkpoint without weights in the cache.
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    safetensors.torch.save_model(model, str(path / "model.safetensors"), metadata={"format": "pt"})
    build_word_tokenizer(pad_token=pad_token).save_pretrained(path)
    return path


def cache_dir() -> Path:
    """Where built-in checkpoints are kept: ``$LIT_RLHF_CACHE`` or ``~/.cache/lit_rlhf``."""
    return Path(os.environ.get("LIT_RLHF_CACHE", Path.home() / ".cache" / "lit_rlhf"))


def resolve_model_path(name_or_path: str, field: str = "model_name_or_path") -> str:
    """Return a loadable path: built-in names are built (once, atomically) into the cache folder, and a ``.gguf``
    file is converted (once) into a plain checkpoint there; a local path that does not exist is an error naming
    ``field`` (rather than the hub's complaint about repo ids)."""
    from lit_rlhf import gguf

    if not name_or_path.startswith(BUILTIN_PREFIX):
        local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
        if (local or gguf.is_gguf(name_or_path)) and not os.path.exists(os.path.expanduser(name_or_path)):
            raise ConfigError(
                f"{field}={name_or_path!r}: no such local folder or file "
                f"({os.path.abspath(os.path.expanduser(name_or_path))}). Give an existing checkpoint folder or .gguf "
                "file, a hub id (org/name) or a built-in name (builtin:tiny-llama, builtin:smollm2-135m-instruct)"
            )
        return gguf.converted_checkpoint(name_or_path, cache_dir()) if gguf.is_gguf(name_or_path) else name_or_path
    name = name_or_path[len(BUILTIN_PREFIX):]
    if name == gguf.SMOLLM2:
        return gguf.converted_checkpoint(gguf.smollm2_gguf(), cache_dir())  # the folder the file's path converts to
    parts = name.split("-")
    if len(parts) not in (2, 3) or parts[0] != "tiny" or (len(parts) == 3 and parts[2] != "classifier"):
        raise ConfigError(
            f"Unknown built-in model {name_or_path!r}: use 'builtin:{gguf.SMOLLM2}', 'builtin:tiny-<arch>' or "
            f"'builtin:tiny-<arch>-classifier' with arch in {sorted(_ARCH_OVERRIDES)}"
        )
    target = cache_dir() / f"{name}-{_BUILD_VERSION}"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
        save_tiny_checkpoint(staging, arch=parts[1], classifier=len(parts) == 3)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its checkpoint is identical
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)
