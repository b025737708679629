"""The recipe's ``model`` sections as typed dataclasses (LightningCLI turns them into YAML with their docs):
the reward, the reference, the PPO/critic-free hyper-parameters, the evaluation and the optimizer.

``model.policy`` is :class:`lit_rlhf.models.PolicyConfig`, ``model.generation``
:class:`lit_rlhf.rollout.SamplingConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from lit_rlhf import ppo as ppo_math
from lit_rlhf.errors import ConfigError
from lit_rlhf.models import DType, Quantization
from lit_rlhf.rewards import RewardTerm


@dataclass
class RewardConfig:
    """Where scores come from: exactly one of a sequence-classification model, a Python function, an HTTP
    scorer, or a weighted list of them (``functions``)."""

    model_name_or_path: Optional[str] = None
    """A sequence-classification checkpoint (hub id, local folder or ``builtin:tiny-<arch>-classifier``)."""
    function: Optional[str] = None
    """``package.module:function`` taking ``(prompts, completions, **columns)`` and returning one score each."""
    url: Optional[str] = None
    """An HTTP scorer: POST ``{"prompts", "completions", <columns>}`` as JSON, answers ``{"scores": [...]}``."""
    functions: Optional[list[RewardTerm]] = None
    """Several weighted sources, e.g. ``[{function: lit_rlhf.rewards:math_answer, weight: 1.0}, {function:
    lit_rlhf.rewards:format_match, weight: 0.2, kwargs: {pattern: ...}}]``; each is logged as ``reward/<name>``."""
    timeout: float = 30.0
    """Seconds an HTTP scorer has to answer."""
    retries: int = 2
    """Further tries after an HTTP scorer failed or timed out; then the run stops with an error."""
    label_index: Optional[int] = None
    """Which logit is the reward, for classifiers with more than one label."""
    dtype: DType = "float32"
    """Dtype of the reward model's weights."""
    quantization: Quantization = None
    """Load the reward model in ``4bit`` (nf4) or ``8bit`` with bitsandbytes."""
    batch_size: Optional[int] = None
    """Score in chunks of this many sequences (None: the whole rollout at once)."""
    missing_eos_penalty: Optional[float] = None
    """Subtracted from the score of every response that never emitted the stop token."""
    normalize: Literal["none", "running", "fixed"] = "none"
    """``running``: standardize scores with the running mean/std of all scores so far;
    ``fixed``: ``(score - shift) / scale``."""
    shift: float = 0.0
    """Subtracted from scores when ``normalize`` is ``fixed``."""
    scale: float = 1.0
    """Divides scores when ``normalize`` is ``fixed``."""
    clip: Optional[float] = None
    """Clip (normalized) scores to ``[-clip, clip]``."""
    overlong_penalty: Optional[float] = None
    """DAPO's soft overlong punishment: responses longer than ``max_new_tokens - overlong_buffer`` lose up to
    this much, linearly, reaching it at ``max_new_tokens`` (None: off)."""
    overlong_buffer: int = 16
    """Tokens before ``max_new_tokens`` over which ``overlong_penalty`` grows."""
    mask_truncated: bool = False
    """Responses that reach ``max_new_tokens`` without a stop token contribute no loss (DAPO's overlong
    filtering); their scores still count in the statistics."""

    def is_empty(self) -> bool:
        """Whether no reward source is set (allowed with an environment, whose step rewards score alone)."""
        return not (self.function or self.model_name_or_path or self.url or self.functions)

    def terms(self, allow_none: bool = False) -> list[RewardTerm]:
        """The reward sources, as weighted terms (one term of weight 1 for the single-source fields); none at all
        only with ``allow_none`` (an environment's step rewards score alone)."""
        if allow_none and self.is_empty():
            return []
        single = [RewardTerm(function=self.function), RewardTerm(model_name_or_path=self.model_name_or_path),
                  RewardTerm(url=self.url)]
        given = [term for term, value in zip(single, (self.function, self.model_name_or_path, self.url)) if value]
        if len(given) + bool(self.functions) != 1:
            raise ConfigError(
                "Set exactly one of reward.model_name_or_path, reward.function, reward.url and reward.functions"
            )
        terms = [RewardTerm(**term) if isinstance(term, dict) else term for term in (self.functions or given)]
        for term in terms:
            term.source()  # exactly one source per term
        names = [term.label() for term in terms]
        if len(set(names)) != len(names):
            raise ConfigError(f"reward.functions: give each source its own name (names: {names})")
        return terms


@dataclass
class ReferenceConfig:
    """The frozen reference policy of the KL penalty."""

    model_name_or_path: Optional[str] = None
    """A separate reference checkpoint (e.g. another SFT model); None uses the policy with its adapter off,
    which holds no second copy of the weights."""
    quantization: Quantization = None
    """Load the separate reference in ``4bit`` or ``8bit`` (its dtype is the policy's)."""


@dataclass
class PPOConfig:
    """PPO hyper-parameters; defaults follow TRL's so that results compare."""

    ppo_epochs: int = 4
    """Optimization passes over each rollout."""
    num_minibatches: int = 1
    """Minibatches per pass; must divide the batch size. One optimizer step per minibatch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch whose gradients are accumulated before the step."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """Clip range of the importance ratio."""
    clip_range_value: float = 0.2
    """Clip range of the value update."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (0 turns it off)."""
    kl_coef: float = 0.05
    """Initial coefficient of the per-token KL penalty against the reference."""
    kl_estimator: ppo_math.KLEstimator = "k1"
    """KL estimator: k1 (log ratio), k2 or k3."""
    adaptive_kl: bool = False
    """Adapt the KL coefficient towards ``kl_target`` (Ziegler et al.)."""
    kl_target: float = 6.0
    """Target sequence KL of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller."""
    whiten_advantages: bool = True
    """Normalize advantages over each rollout."""
    whiten_rewards: bool = False
    """Normalize rewards (without shifting the mean) before GAE."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the gradient norm to this value; None turns clipping off."""
    target_kl: Optional[float] = None
    """Stop the PPO epochs of an iteration early once the mean approx KL exceeds this."""
    advantage_estimator: ppo_math.AdvantageEstimator = "gae"
    """``gae``: PPO with a value function; critic-free: ``grpo`` (group mean baseline, scaled by
    ``scale_rewards``), ``rloo`` (leave-one-out baseline), ``reinforce_pp`` (REINFORCE++: returns of the
    KL-penalized token rewards, whitened over the batch), ``reinforce_pp_baseline`` (group mean subtracted first).
    The group estimators need ``generation.num_generations`` > 1."""
    scale_rewards: ppo_math.RewardScaling = "group"
    """GRPO: divide by the group's std (``group``), the batch's (``batch``), or not at all (``none``: Dr.GRPO)."""
    multi_turn_credit: Literal["trajectory", "turn"] = "trajectory"
    """GRPO/RLOO over multi-turn trajectories: ``trajectory`` gives every turn the trajectory's advantage (its summed
    score against its group's); ``turn`` gives each turn the advantage of its own return (the step rewards of this
    turn and the later ones) against the group's trajectories at the same turn. GAE and REINFORCE++ always credit
    each step reward from the turn that earned it."""
    loss_aggregation: ppo_math.LossAggregation = "token_mean"
    """How token losses are averaged: ``token_mean``, ``seq_mean_token_mean``, ``seq_mean_token_sum`` or
    ``seq_mean_token_sum_norm`` (Dr.GRPO: divided by responses x ``max_new_tokens``)."""
    clip_range_high: Optional[float] = None
    """Upper clip range of the ratio (DAPO's clip-higher, e.g. 0.28); None: ``clip_range``."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """``sequence`` (GSPO): each response's ratio is the geometric mean of its token ratios (use small clip
    ranges, e.g. 3e-4 / 4e-4)."""
    kl_in_loss: bool = False
    """GRPO-style: penalize the k3 KL to the reference in the loss (``kl_loss_coef``) instead of the reward.
    With ``kl_coef: 0`` and no ``kl_in_loss`` no reference is computed or loaded."""
    kl_loss_coef: float = 0.001
    """Weight of the KL term in the loss when ``kl_in_loss``."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose scores are all equal (no learning signal) and sample replacements from new
    prompts, up to ``dynamic_sampling_max_retries`` times; then fill up with the dropped groups."""
    rollout_correction: Literal["none", "tis"] = "none"
    """Samples from an engine whose log-probs differ from the trainer's (vLLM in bf16): ``tis`` weighs each
    token's loss by the truncated importance ratio ``min(pi_trainer / pi_engine, tis_cap)``."""
    tis_cap: float = 2.0
    """Cap of the truncated importance sampling weight."""
    dynamic_sampling_max_retries: int = 3
    """Extra sampling rounds per iteration for ``dynamic_sampling``."""
    disable_dropout: bool = True
    """Set every dropout probability of the policy to 0, so PPO passes compute the same log-probs as the
    rollout did (rollouts never use dropout). The PPO passes run in training mode either way."""
    max_consecutive_skips: int = 5
    """Optimizer steps are skipped (with a warning) when the loss or a gradient is NaN/inf; after this many
    skips in a row the run stops with an error and a checkpoint of the last good state."""


@dataclass
class EvaluationConfig:
    """Completions for the held-out prompts (``data.val_path``) during training, logged under ``eval/``."""

    temperature: float = 0.0
    """Sampling temperature of the evaluation; 0 is greedy."""
    num_samples: int = 1
    """Completions per prompt; with more than 1 (and a temperature above 0), ``eval/pass@<num_samples>`` is
    logged: the share of prompts with at least one passing completion."""
    max_new_tokens: Optional[int] = None
    """Longest evaluation completion (None: ``generation.max_new_tokens``)."""
    pass_threshold: float = 1.0
    """A completion passes when its total score is at least this (1 for 0/1 verifiable rewards)."""
    before_training: bool = False
    """Also evaluate once before the first update (logged at step 0): where the policy started."""


@dataclass
class OptimizerConfig:
    """AdamW on the LoRA and value-head weights, with an optional warm-up and decay."""

    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-5
    """Adam epsilon (1e-5, as in the published PPO implementations)."""
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    """Decay of the learning rate to 0 over the run (per optimizer step)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""

    def check(self, field: str = "model.optimizer") -> None:
        """Refuse settings AdamW cannot use, naming the field (before any weight loads)."""
        problems = [
            (self.lr <= 0, f"{field}.lr={self.lr} must be positive (e.g. 1e-5 for a full model, 1e-4 to 3e-3 for LoRA)"),
            (self.weight_decay < 0, f"{field}.weight_decay={self.weight_decay} must be 0 or more"),
            (self.eps <= 0, f"{field}.eps={self.eps} must be positive (e.g. 1e-5)"),
            (len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas),
             f"{field}.betas={list(self.betas)} must be two numbers in [0, 1) (e.g. [0.9, 0.999])"),
            (self.warmup_steps < 0, f"{field}.warmup_steps={self.warmup_steps} must be 0 or more"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)


def optimizer_and_schedule(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig, total_steps: int) -> dict[str, Any]:
    """AdamW on ``params`` with ``cfg``'s warm-up and decay over ``total_steps`` optimizer steps, stepped per
    optimizer step (Lightning's ``configure_optimizers`` answer)."""
    optimizer = torch.optim.AdamW(list(params), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    total = max(total_steps, 1)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min((step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1), 1.0)
        if cfg.scheduler == "linear":
            return 1.0 - progress
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def apply_optimizer_config(optimizer: torch.optim.Optimizer, scheduler: Any, cfg: OptimizerConfig) -> None:
    """Make an optimizer and schedule (restored from a checkpoint) follow ``cfg``, the recipe that runs now: its
    peak learning rate, betas, eps and weight decay, and the learning rate its schedule gives the current step.

    A fresh run is unchanged. A resumed one continues its step count, optimizer moments and schedule position,
    with the settings and schedule (``optimizer_and_schedule`` built it for the run's current length) of now.
    """
    for group in optimizer.param_groups:
        group.update(initial_lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = cfg.lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
