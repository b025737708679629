"""lit-rlhf: PPO for RLHF of LoRA-adapted causal LMs, on PyTorch Lightning."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Imported on first use, so that `lit-rlhf --help` and `--version` answer at once.
_EXPORTS = {
    "OptimizerConfig": "lit_rlhf.module", "PPOConfig": "lit_rlhf.module", "PPOModule": "lit_rlhf.module",
    "RewardConfig": "lit_rlhf.module", "PolicyConfig": "lit_rlhf.models", "PolicyWithValueHead": "lit_rlhf.models",
    "load_policy": "lit_rlhf.models", "load_tokenizer": "lit_rlhf.models", "PromptDataModule": "lit_rlhf.data",
    "SamplingConfig": "lit_rlhf.rollout",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lit_rlhf' has no attribute {name!r}")
