"""Advantage estimation: which estimator a recipe asks for (``ppo.advantage_estimator``), as a pure function of
tensors, the PPO settings and an all-reduce (a sum over data-parallel ranks; none in one process).

``gae``: GAE over the KL-penalized token rewards with the critic's values. ``grpo``/``rloo``: the group baseline
of each response's KL-penalized score, on every token. ``reinforce_pp`` (and ``_baseline``, the group mean
subtracted from the scores first): discounted returns of the KL-penalized token rewards, whitened over the batch.
The maths of each is in :mod:`lit_rlhf.ppo`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from lit_rlhf import ppo as ppo_math
from lit_rlhf.errors import ConfigError

if TYPE_CHECKING:
    from lit_rlhf.configs import PPOConfig


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """``-kl_coef * kl`` on every token, plus each response's score on its last real token ``[batch, len]``."""
    rewards = -kl_coef * kl
    rewards[torch.arange(scores.shape[0], device=scores.device), ppo_math.last_valid_index(mask)] += scores
    return rewards


def estimate_advantages(
    scores: Tensor, kl: Tensor, values: Optional[Tensor], mask: Tensor, hp: PPOConfig, group_size: int,
    kl_coef: float, all_reduce: ppo_math.AllReduceSum = ppo_math._no_reduce,
) -> tuple[Tensor, Tensor, Tensor]:
    """Advantages, returns and per-token rewards ``[batch, len]`` of ``hp.advantage_estimator``.

    ``scores`` are ``[batch]`` (groups of ``group_size`` consecutive rows), ``kl`` the per-token KL to the
    reference, ``values`` the critic's (``gae`` only); batch statistics (whitening, the batch std) are taken
    over every rank through ``all_reduce``.
    """
    estimator = hp.advantage_estimator
    if estimator in ("gae", "reinforce_pp", "reinforce_pp_baseline"):
        # multi-turn trajectories: the recursions run over the model's tokens only, the environment's skipped
        order = ppo_math.packing_order(mask)
        packed = _token_estimate(scores, ppo_math.pack(kl, order), ppo_math.pack(values, order) if values is not None
                                 else None, ppo_math.pack(mask, order), hp, group_size, kl_coef, all_reduce)
        return tuple(ppo_math.unpack(x, order) for x in packed)  # type: ignore[return-value]
    if estimator in ("grpo", "rloo"):
        rewards = token_rewards(scores, kl, mask, kl_coef)
        penalized = scores - kl_coef * kl.sum(1)
        if estimator == "rloo":
            per_response = ppo_math.rloo_advantages(penalized, group_size)
        elif hp.scale_rewards == "batch":  # the std of every rank's scores, so ranks scale alike
            centered = ppo_math.grpo_advantages(penalized, group_size, "none")
            std = ppo_math.masked_var(penalized, torch.ones_like(penalized), all_reduce=all_reduce).sqrt()
            per_response = centered / (std + 1e-6)
        else:
            per_response = ppo_math.grpo_advantages(penalized, group_size, hp.scale_rewards)
        advantages = ppo_math.sequence_to_tokens(per_response, mask)
        return advantages, advantages, rewards
    raise ConfigError(f"ppo.advantage_estimator={estimator!r}: use gae, grpo, rloo, reinforce_pp or reinforce_pp_baseline")


def _token_estimate(
    scores: Tensor, kl: Tensor, values: Optional[Tensor], mask: Tensor, hp: PPOConfig, group_size: int,
    kl_coef: float, all_reduce: ppo_math.AllReduceSum,
) -> tuple[Tensor, Tensor, Tensor]:
    """The estimators with a recursion over tokens (GAE, REINFORCE++), on tokens whose mask is a prefix."""
    estimator = hp.advantage_estimator
    if estimator == "reinforce_pp_baseline":
        scores = ppo_math.group_baseline(scores, group_size)
    rewards = token_rewards(scores, kl, mask, kl_coef)
    if estimator == "gae":
        if values is None:
            raise ConfigError("ppo.advantage_estimator=gae needs a critic (values)")
        if hp.whiten_rewards:
            rewards = ppo_math.masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce)
        advantages, returns = ppo_math.compute_gae(rewards, values, mask, hp.gamma, hp.lam)
        if hp.whiten_advantages:
            advantages = ppo_math.masked_whiten(advantages, mask, all_reduce=all_reduce)
        return advantages, returns, rewards
    returns = ppo_math.discounted_returns(rewards, mask, hp.gamma)
    return ppo_math.masked_whiten(returns, mask, all_reduce=all_reduce), returns, rewards
