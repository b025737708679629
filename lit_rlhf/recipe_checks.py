"""Checks of a PPO recipe that need no model weights: settings that cannot work together, batch sizes that do
not divide, lengths past the model's context. Each fails with one line naming the fields and the fix."""

from __future__ import annotations

import warnings
from typing import Any, Optional

from lit_rlhf import ppo as ppo_math
from lit_rlhf.configs import EvaluationConfig, PPOConfig, ReferenceConfig
from lit_rlhf.errors import ConfigError
from lit_rlhf.models import PolicyConfig
from lit_rlhf.rollout import SamplingConfig


def check_algorithm(
    policy: PolicyConfig, sampling: SamplingConfig, hp: PPOConfig, reference: ReferenceConfig,
    sharded: bool, strategy_name: str, multi_turn: bool = False,
) -> None:
    """Settings that cannot work together, named with their fields (``sharded``: ModelParallelStrategy,
    ``multi_turn``: an environment)."""
    groups = sampling.num_generations
    if hp.multi_turn_credit not in ("trajectory", "turn"):
        raise ConfigError(f"ppo.multi_turn_credit={hp.multi_turn_credit!r}: use trajectory or turn")
    if hp.multi_turn_credit == "turn" and not multi_turn:
        raise ConfigError("ppo.multi_turn_credit=turn credits the turns of multi-turn trajectories: it needs "
                          "model.environment; remove it for single responses")
    if hp.multi_turn_credit == "turn" and hp.advantage_estimator not in ("grpo", "rloo"):
        raise ConfigError(f"ppo.multi_turn_credit=turn is for grpo and rloo: {hp.advantage_estimator} already credits "
                          "each step reward from the turn that earned it; remove it")
    if groups < 1:
        raise ConfigError(f"generation.num_generations must be >= 1, got {groups}")
    if hp.advantage_estimator in ("grpo", "rloo", "reinforce_pp_baseline") and groups < 2:
        raise ConfigError(
            f"ppo.advantage_estimator={hp.advantage_estimator} compares the responses to one prompt: set "
            "generation.num_generations to 2 or more (e.g. 8)"
        )
    if hp.importance_sampling_level == "sequence":
        ppo_math.sequence_level_aggregation(hp.loss_aggregation)  # GSPO averages over responses
    if hp.dynamic_sampling and groups < 2:
        raise ConfigError("ppo.dynamic_sampling drops groups of equal scores: set generation.num_generations >= 2")
    if policy.critic == "adapter" and sharded:
        raise ConfigError("policy.critic=adapter is not supported with sharding (ModelParallelStrategy) yet")
    if hp.rollout_correction == "tis" and sampling.engine != "vllm":
        raise ConfigError("ppo.rollout_correction=tis corrects for an engine's sampling: it needs generation.engine: vllm")
    if sampling.engine == "vllm":
        from lit_rlhf.engines import check_engine_supports

        check_engine_supports(policy.quantization, strategy_name)
    if reference.model_name_or_path is not None and not uses_reference(hp):
        warnings.warn(
            "reference.model_name_or_path is set but ppo.kl_coef is 0 and ppo.kl_in_loss is false: the "
            "reference is not used and not loaded", UserWarning, stacklevel=3,
        )


def uses_reference(hp: PPOConfig) -> bool:
    """Whether a reference is computed at all: not with ``kl_coef: 0`` and no ``kl_in_loss``."""
    return hp.kl_coef != 0 or hp.kl_in_loss


def response_budgets(sampling: SamplingConfig, evaluation: EvaluationConfig) -> list[tuple[str, int]]:
    """The longest responses the run samples, with their fields: training rollouts and evaluation."""
    budgets = [("generation.max_new_tokens", sampling.max_new_tokens)]
    if evaluation.max_new_tokens is not None:
        budgets.append(("evaluation.max_new_tokens", evaluation.max_new_tokens))
    return budgets


def check_prompt_budget(max_prompt_length: int, budgets: list[tuple[str, int]], context: Optional[int]) -> None:
    """Prompt plus the longest response must fit the model's context."""
    for field, new_tokens in budgets:
        total = max_prompt_length + new_tokens
        if context is not None and total > context:
            raise ConfigError(
                f"data.max_prompt_length={max_prompt_length} + {field}={new_tokens} = {total} exceeds the "
                f"context of policy.model_name_or_path ({context} tokens): lower one of them"
            )


def check_trajectory_budget(max_total_tokens: int, context: Optional[int]) -> None:
    """A multi-turn trajectory's token budget must fit the model's context."""
    if context is not None and max_total_tokens > context:
        raise ConfigError(
            f"model.environment.max_total_tokens={max_total_tokens} exceeds the context of policy.model_name_or_path "
            f"({context} tokens): lower it"
        )


def minibatch_sizes(hp: PPOConfig, groups: int, batch_size: int) -> tuple[int, int]:
    """Minibatch and micro-batch sizes for ``data.batch_size`` prompts (x ``num_generations`` responses)."""
    per_step = hp.num_minibatches * hp.gradient_accumulation_steps
    rows = batch_size * groups
    if rows % per_step:
        times = f" x generation.num_generations={groups} = {rows} responses" if groups > 1 else ""
        raise ConfigError(
            f"data.batch_size={batch_size}{times} is not divisible by ppo.num_minibatches={hp.num_minibatches} "
            f"x ppo.gradient_accumulation_steps={hp.gradient_accumulation_steps}: choose values that divide it"
        )
    minibatch_size = rows // hp.num_minibatches
    return minibatch_size, minibatch_size // hp.gradient_accumulation_steps


def check_sequence_length(model_config: Any, context_length: int, max_new_tokens: int) -> None:
    """A prompt of ``context_length`` tokens plus ``max_new_tokens`` must fit the model's positions."""
    limit = getattr(model_config, "max_position_embeddings", None)
    total = context_length + max_new_tokens
    if limit is not None and total > limit:
        raise ConfigError(
            f"Prompt length {context_length} + {max_new_tokens} new tokens = {total} exceeds the model's context "
            f"of {limit} tokens: lower data.max_prompt_length, generation.max_new_tokens or evaluation.max_new_tokens"
        )
