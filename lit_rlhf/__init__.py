"""lit-rlhf: PPO for RLHF of LoRA-adapted causal LMs, on PyTorch Lightning."""

from lit_rlhf.data import PromptDataModule
from lit_rlhf.models import PolicyConfig, PolicyWithValueHead, load_policy, load_tokenizer
from lit_rlhf.module import OptimizerConfig, PPOConfig, PPOModule, RewardConfig
from lit_rlhf.rollout import SamplingConfig

__all__ = [
    "OptimizerConfig", "PPOConfig", "PPOModule", "PolicyConfig", "PolicyWithValueHead", "PromptDataModule",
    "RewardConfig", "SamplingConfig", "load_policy", "load_tokenizer",
]
__version__ = "0.1.0"
