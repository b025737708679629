"""Advantage estimation: which estimator a recipe asks for (``ppo.advantage_estimator``), as a pure function of
tensors, the PPO settings and an all-reduce (a sum over data-parallel ranks; none in one process).

``gae``: GAE over the KL-penalized token rewards with the critic's values. ``grpo``/``rloo``: the group baseline
of each response's KL-penalized score, on every token. ``reinforce_pp`` (and ``_baseline``, the group mean
subtracted from the scores first): discounted returns of the KL-penalized token rewards, whitened over the batch.
The maths of each is in :mod:`lit_rlhf.ppo`.

Multi-turn trajectories: the token rewards hold each step reward on the last token of the turn that earned it
(``step_rewards``), so GAE and REINFORCE++ credit a turn with what came after it only; GRPO and RLOO give every
turn the trajectory's advantage, or with ``ppo.multi_turn_credit: turn`` each turn the advantage of its own return
against the group's at the same turn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from lit_rlhf import ppo as ppo_math
from lit_rlhf.errors import ConfigError

if TYPE_CHECKING:
    from lit_rlhf.configs import PPOConfig


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float,
                  step_rewards: Optional[Tensor] = None) -> Tensor:
    """``-kl_coef * kl`` on every token, plus each response's score on its last real token ``[batch, len]`` (a
    trajectory's step rewards on the last token of their turns, :func:`lit_rlhf.ppo.place_scores`)."""
    return -kl_coef * kl + ppo_math.place_scores(scores, mask, step_rewards)


def estimate_advantages(
    scores: Tensor, kl: Tensor, values: Optional[Tensor], mask: Tensor, hp: PPOConfig, group_size: int,
    kl_coef: float, all_reduce: ppo_math.AllReduceSum = ppo_math._no_reduce, step_rewards: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Advantages, returns and per-token rewards ``[batch, len]`` of ``hp.advantage_estimator``.

    ``scores`` are ``[batch]`` (groups of ``group_size`` consecutive rows), ``kl`` the per-token KL to the
    reference, ``values`` the critic's (``gae`` only); batch statistics (whitening, the batch std) are taken
    over every rank through ``all_reduce``. ``step_rewards`` (multi-turn, ``[batch, len]``): the part of each
    score the environment gave, on the last token of the turn that earned it.
    """
    estimator = hp.advantage_estimator
    if estimator in ("gae", "reinforce_pp", "reinforce_pp_baseline"):
        # multi-turn trajectories: the recursions run over the model's tokens only, the environment's skipped
        order = ppo_math.packing_order(mask)
        pack = lambda x: ppo_math.pack(x, order) if x is not None else None  # noqa: E731
        packed = _token_estimate(scores, pack(kl), pack(values), pack(mask), hp, group_size, kl_coef, all_reduce,
                                 pack(step_rewards))
        return tuple(ppo_math.unpack(x, order) for x in packed)  # type: ignore[return-value]
    if estimator in ("grpo", "rloo"):
        rewards = token_rewards(scores, kl, mask, kl_coef, step_rewards)
        if hp.multi_turn_credit == "turn":  # each turn's return (its rewards and the later ones) against the group's
            order = ppo_math.packing_order(mask)
            returns = ppo_math.unpack(ppo_math.discounted_returns(
                ppo_math.pack(rewards, order), ppo_math.pack(mask, order), 1.0), order)
            advantages = ppo_math.turn_group_advantages(returns, mask, group_size, estimator, hp.scale_rewards,
                                                        all_reduce)
            return advantages, advantages, rewards
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
    kl_coef: float, all_reduce: ppo_math.AllReduceSum, step_rewards: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """The estimators with a recursion over tokens (GAE, REINFORCE++), on tokens whose mask is a prefix."""
    estimator = hp.advantage_estimator
    if estimator == "reinforce_pp_baseline":
        scores = ppo_math.group_baseline(scores, group_size)
    rewards = token_rewards(scores, kl, mask, kl_coef, step_rewards)
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
