"""Pure PPO maths for RLHF: masked statistics, KL estimators, rewards, GAE, losses, KL controllers.

No Lightning and no models here: every function takes tensors and returns tensors, so each can be
checked against hand-computed values. Per-token tensors are ``[batch, response_len]`` and ``mask`` is 1
for real response tokens (up to and including the stop token) and 0 after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Optional

import torch
from torch import Tensor

from lit_rlhf.errors import ConfigError

KLEstimator = Literal["k1", "k2", "k3"]
AllReduceSum = Callable[[Tensor], Tensor]


def _no_reduce(x: Tensor) -> Tensor:
    return x


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1 (all of them when ``dim`` is None)."""
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def _masked_moments(x: Tensor, mask: Tensor, unbiased: bool, all_reduce: AllReduceSum) -> tuple[Tensor, Tensor]:
    """Mean and variance of the masked entries of ``x``; ``all_reduce`` sums partial sums across processes."""
    total = all_reduce(torch.stack([(x * mask).sum(), mask.sum()]))
    count = total[1]
    mean = total[0] / count
    squares = all_reduce(((x - mean) ** 2 * mask).sum())
    if not unbiased:
        return mean, squares / count
    if count < 2:
        raise ConfigError("masked_var needs at least two unmasked entries for an unbiased variance")
    return mean, squares / (count - 1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, all_reduce: AllReduceSum = _no_reduce) -> Tensor:
    """Variance of the masked entries of ``x``, Bessel-corrected when ``unbiased``.

    ``all_reduce`` sums a tensor across processes, so that data-parallel ranks get the variance of the
    whole batch; the default is one process.
    """
    return _masked_moments(x, mask, unbiased, all_reduce)[1]


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, all_reduce: AllReduceSum = _no_reduce) -> Tensor:
    """Normalize the masked entries to unit variance (and zero mean when ``shift_mean``).

    Masked-out positions of the result are 0. The statistics are those of :func:`masked_var`, over all
    processes with ``all_reduce``.
    """
    mean, var = _masked_moments(x, mask, True, all_reduce)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens (Schulman's k1, k2, k3)."""
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.exp(-d) - 1 + d
    raise ConfigError(f"Unknown KL estimator {estimator!r}: use 'k1', 'k2' or 'k3'")


def last_valid_index(mask: Tensor) -> Tensor:
    """Index of the last position where ``mask`` is 1, per row (``[batch]``)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).argmax(dim=1)


def packing_order(mask: Tensor) -> Tensor:
    """Per row, the column order that moves the masked positions to the front, keeping their order: a
    multi-turn trajectory's model tokens side by side, with the environment's tokens between them left out.
    The identity for a mask that is already a prefix (a single-turn response)."""
    return torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices


def pack(x: Tensor, order: Tensor) -> Tensor:
    """``x`` with its columns in ``order`` (:func:`packing_order`)."""
    return x.gather(1, order)


def unpack(x: Tensor, order: Tensor) -> Tensor:
    """Undo :func:`pack`: each packed column back to its own position."""
    return torch.empty_like(x).scatter_(1, order, x)


def turn_index(mask: Tensor) -> Tensor:
    """The 1-based turn of each masked position ``[batch, len]`` (0 where ``mask`` is 0): a multi-turn
    trajectory's model turns are the runs of its mask, separated by the environment's tokens."""
    model = mask > 0
    starts = model & ~torch.nn.functional.pad(model[:, :-1], (1, 0), value=False)
    return torch.cumsum(starts.long(), dim=1) * model.long()


def place_scores(scores: Tensor, mask: Tensor, step_rewards: Optional[Tensor] = None) -> Tensor:
    """Each response's score as per-token rewards ``[batch, len]``: a multi-turn trajectory's step rewards where
    they were earned (``step_rewards``, on the last token of each turn), the rest of its score (a reward model's
    share, penalties, shaping) on its last real token; a single-turn score all on its last real token."""
    placed = torch.zeros_like(mask, dtype=scores.dtype if scores.is_floating_point() else mask.dtype)
    rest = scores
    if step_rewards is not None:
        placed = placed + step_rewards.to(placed.dtype) * mask
        rest = scores - (step_rewards * mask).sum(1).to(scores.dtype)
    placed[torch.arange(scores.shape[0], device=scores.device), last_valid_index(mask)] += rest.to(placed.dtype)
    return placed


def turn_group_advantages(
    returns: Tensor, mask: Tensor, group_size: int, estimator: Literal["grpo", "rloo"] = "grpo",
    scale: RewardScaling = "group", all_reduce: AllReduceSum = _no_reduce, eps: float = 1e-6,
) -> Tensor:
    """Turn-level credit for the group estimators: each turn's tokens get the advantage of the turn's return
    (``returns`` at its first token: the rewards of this turn and the later ones), against the returns of the
    group's trajectories at the same turn (GRPO: minus their mean, scaled as ``scale``; RLOO: minus the mean of
    the others). A turn that only one trajectory of its group reached gets 0."""
    turns = turn_index(mask)
    count = int(turns.max()) if turns.numel() else 0
    firsts = torch.zeros(mask.shape[0], count, dtype=torch.long, device=mask.device)
    present = torch.zeros(mask.shape[0], count, dtype=returns.dtype, device=mask.device)
    for k in range(count):
        in_turn = turns == k + 1
        firsts[:, k] = in_turn.to(torch.int8).argmax(1)
        present[:, k] = in_turn.any(1).to(returns.dtype)
    per_turn = returns.gather(1, firsts) * present  # [batch, turns]
    groups, reached = per_turn.view(-1, group_size, count), present.view(-1, group_size, count)
    n = reached.sum(1, keepdim=True)
    total = groups.sum(1, keepdim=True)
    if estimator == "rloo":
        advantages = groups - (total - groups) / (n - 1).clamp(min=1)
    else:
        mean = total / n.clamp(min=1)
        advantages = groups - mean
        if scale == "group":
            std = ((advantages**2 * reached).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
            advantages = advantages / (std + eps)
        elif scale == "batch":
            advantages = advantages / (masked_var(per_turn, present, all_reduce=all_reduce).sqrt() + eps)
        elif scale != "none":
            raise ConfigError(f"ppo.scale_rewards={scale!r}: use group, batch or none")
    advantages = (advantages * reached * (n > 1)).view(-1, count)
    return torch.cat([torch.zeros_like(advantages[:, :1]), advantages], 1).gather(1, turns) * mask


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: ``-kl_coef * KL`` everywhere, plus the sequence score on the last real token.

    Returns ``(rewards, kl)``, both ``[batch, response_len]`` and 0 where ``mask`` is 0.
    """
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_valid_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation, the episode ending after the last real token.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, with V and A
    beyond the last real token counted as 0. Returns ``(advantages, returns)`` with
    ``returns = advantages + values``; both are 0 where ``mask`` is 0.
    """
    mask = mask.to(values.dtype)
    # Whether step t+1 still belongs to the episode; the step after the last column never does.
    continues = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1) * continues
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        running = deltas[:, t] + gamma * lam * running * continues[:, t]
        advantages[:, t] = running
    advantages = advantages * mask
    returns = (advantages + values) * mask
    return advantages, returns


# ---------------------------------------------------------------------------------------------------
# Critic-free advantages. A rollout holds ``num_generations`` responses per prompt, consecutive rows:
# group g is rows ``g * G ... g * G + G - 1``. ``scores`` are ``[batch]`` sequence rewards.

AdvantageEstimator = Literal["gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
RewardScaling = Literal["group", "batch", "none"]
LossAggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


def _groups(scores: Tensor, group_size: int) -> Tensor:
    if group_size < 1 or scores.numel() % group_size:
        raise ConfigError(f"{scores.numel()} responses do not split into groups of num_generations={group_size}")
    return scores.view(-1, group_size)


def grpo_advantages(scores: Tensor, group_size: int, scale: RewardScaling = "group", eps: float = 1e-6) -> Tensor:
    """GRPO: each score minus its group's mean, divided by the group's std (``group``), the batch's std
    (``batch``) or nothing (``none``, Dr.GRPO). Returns ``[batch]``; a group of one gets 0."""
    groups = _groups(scores, group_size)
    centered = groups - groups.mean(1, keepdim=True)
    if scale == "group":
        std = groups.std(1, keepdim=True) if group_size > 1 else torch.ones_like(groups[:, :1])
        centered = centered / (std + eps)
    elif scale == "batch":
        centered = centered / (scores.std() + eps if scores.numel() > 1 else 1.0)
    elif scale != "none":
        raise ConfigError(f"ppo.scale_rewards={scale!r}: use group, batch or none")
    return centered.flatten()


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """RLOO: each score minus the mean of the other scores of its group (needs groups of 2 or more)."""
    if group_size < 2:
        raise ConfigError("ppo.advantage_estimator=rloo needs generation.num_generations >= 2 (leave-one-out)")
    groups = _groups(scores, group_size)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).flatten()


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` within each response (0 where ``mask`` is 0)."""
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running * mask[:, t]
        returns[:, t] = running
    return returns * mask


def group_baseline(scores: Tensor, group_size: int) -> Tensor:
    """Each score minus its group's mean (REINFORCE++ with baseline): GRPO's centering, unscaled."""
    return grpo_advantages(scores, group_size, scale="none")


def sequence_to_tokens(values: Tensor, mask: Tensor) -> Tensor:
    """A per-response value ``[batch]`` on every response token ``[batch, len]`` (0 after the response)."""
    return values.unsqueeze(1).to(mask.dtype) * mask


def overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer: int, penalty: float) -> Tensor:
    """DAPO's soft overlong punishment: 0 up to ``max_new_tokens - buffer`` tokens, then falling linearly to
    ``-penalty`` at ``max_new_tokens``."""
    if buffer <= 0:
        raise ConfigError("reward.overlong_buffer must be a positive number of tokens")
    start = max_new_tokens - buffer
    return -penalty * ((lengths.float() - start) / buffer).clamp(0.0, 1.0)


def aggregation_count(mask: Tensor, mode: LossAggregation = "token_mean", max_new_tokens: int = 0) -> Tensor:
    """What :func:`aggregate` divides by for the rows of ``mask``: their loss tokens (``token_mean``), their
    responses with a loss token (``seq_mean_token_mean``, ``seq_mean_token_sum``), or rows x ``max_new_tokens``
    (``seq_mean_token_sum_norm``).

    Summed over a minibatch's micro-batches and over the ranks, it is the minibatch's normalizer: each part's
    ``aggregate(..., normalizer=total)`` then adds up to the minibatch's loss, however it is split.
    """
    if mode == "token_mean":
        return mask.sum()
    if mode in ("seq_mean_token_mean", "seq_mean_token_sum"):
        return (mask.sum(1) > 0).sum().to(mask.dtype)
    if mode == "seq_mean_token_sum_norm":
        if max_new_tokens <= 0:
            raise ConfigError("loss_aggregation=seq_mean_token_sum_norm needs generation.max_new_tokens > 0")
        return torch.tensor(float(mask.shape[0] * max_new_tokens), device=mask.device)
    raise ConfigError(f"ppo.loss_aggregation={mode!r}: use token_mean, seq_mean_token_mean, seq_mean_token_sum "
                      "or seq_mean_token_sum_norm")


def aggregate(
    values: Tensor, mask: Tensor, mode: LossAggregation = "token_mean", max_new_tokens: int = 0,
    normalizer: Optional[Tensor] = None,
) -> Tensor:
    """Reduce per-token losses ``[batch, len]`` to a scalar.

    ``token_mean``: over all tokens (long responses weigh more); ``seq_mean_token_mean``: per response, then over
    responses; ``seq_mean_token_sum``: summed per response, mean over responses; ``seq_mean_token_sum_norm``:
    summed, divided by responses x ``max_new_tokens`` (Dr.GRPO's constant normalizer: no length bias).
    ``normalizer`` replaces the divisor :func:`aggregation_count` gives for these rows: the count of a whole
    minibatch over all ranks, when these rows are one micro-batch of it. Fully masked rows (and batches)
    contribute 0, not NaN.
    """
    count = aggregation_count(mask, mode, max_new_tokens) if normalizer is None else normalizer
    if mode == "seq_mean_token_mean":
        total = ((values * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()
    else:
        total = (values * mask).sum()
    return total / count.clamp(min=1)


def sequence_level_aggregation(mode: LossAggregation) -> LossAggregation:
    """The aggregation GSPO (``importance_sampling_level: sequence``) uses for ``mode``.

    GSPO's objective averages the clipped sequence terms over responses; with the sequence ratio on every token,
    ``token_mean`` would weigh each response by its length, so it becomes the per-response mean. The summing
    modes would weigh by length too: refused.
    """
    if mode in ("token_mean", "seq_mean_token_mean"):
        return "seq_mean_token_mean"
    raise ConfigError(
        f"ppo.importance_sampling_level=sequence (GSPO) averages over responses: ppo.loss_aggregation={mode!r} would "
        "weigh each response by its length. Use token_mean or seq_mean_token_mean"
    )


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float,
    clip_range_high: Optional[float] = None, sequence_level: bool = False,
    aggregation: LossAggregation = "token_mean", max_new_tokens: int = 0, token_weights: Optional[Tensor] = None,
    normalizer: Optional[Tensor] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped importance-ratio surrogate loss (to minimize), aggregated over the mask.

    The ratio is clipped to ``[1 - clip_range, 1 + clip_range_high]`` (DAPO's clip-higher when
    ``clip_range_high > clip_range``). With ``sequence_level`` (GSPO) every token of a response uses the
    response's ratio, the geometric mean of its token ratios, while each token keeps its own gradient path,
    and responses are averaged (:func:`sequence_level_aggregation`); a response without loss tokens gets ratio 1.
    ``token_weights`` (no gradient) multiply each token's loss; ``normalizer`` is :func:`aggregate`'s.
    ``stats`` holds ``clipfrac`` (share of tokens where clipping binds), ``approx_kl`` (``0.5 * E[(log r)^2]``,
    token level) and ``ratio`` (mean importance ratio).
    """
    high = clip_range if clip_range_high is None else clip_range_high
    token_log_ratio = logprobs - old_logprobs
    log_ratio = token_log_ratio
    if sequence_level:
        aggregation = sequence_level_aggregation(aggregation)
        # a response without loss tokens (reward.mask_truncated) would be 0/0: its mean log ratio is 0 instead
        sequence = ((token_log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1)).unsqueeze(1)
        log_ratio = sequence.detach() + logprobs - logprobs.detach()  # value: the sequence's; gradient: per token
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    per_token = torch.max(unclipped, clipped)
    if token_weights is not None:  # e.g. truncated importance sampling of an engine's samples
        per_token = per_token * token_weights
    loss = aggregate(per_token, mask, aggregation, max_new_tokens, normalizer)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean(token_log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float,
    normalizer: Optional[Tensor] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5 * E[max((V - R)^2, (V_clip - R)^2)]`` over the masked tokens, with
    ``stats['clipfrac']``; ``normalizer`` replaces the token count (a minibatch's, when these rows are part of it)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * aggregate(torch.max(unclipped_error, clipped_error), mask, "token_mean", normalizer=normalizer)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution given by ``logits`` over the last dimension."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


class RunningMoments:
    """Running mean and standard deviation of every value seen so far (parallel Welford updates)."""

    def __init__(self) -> None:
        self.count, self.mean, self.var = 0, 0.0, 1.0

    def update(self, values: Tensor) -> None:
        """Fold a batch of values into the running mean and (population) variance."""
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean, batch_var = values.mean().item(), values.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return self.var**0.5

    def normalize(self, values: Tensor) -> Tensor:
        """``(values - mean) / std`` with the running statistics."""
        return (values - self.mean) / max(self.std, 1e-8)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.var = int(state["count"]), float(state["mean"]), float(state["var"])


class FixedKLController:
    """A KL coefficient that never changes."""

    def __init__(self, coef: float) -> None:
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep the coefficient as it is."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional controller steering the KL towards ``target`` (Ziegler et al., 2019)."""

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        super().__init__(init_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient by ``clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def distinct_n(sequences: list[list[int]], n: int = 2) -> float:
    """Share of distinct n-grams among all n-grams of ``sequences`` (1: all different; near 0: collapse)."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def truncated_importance_weights(trainer_logprobs: Tensor, engine_logprobs: Tensor, cap: float) -> Tensor:
    """``min(pi_trainer / pi_engine, cap)`` per sampled token: corrects for sampling with an engine whose
    probabilities differ from the trainer's (truncated importance sampling)."""
    return torch.exp(trainer_logprobs - engine_logprobs).clamp(max=cap)
