"""Everything across ranks in one place: the collectives of a PPO iteration (sums, maxima, means, gathers; each
the value itself in a single-process run or without a trainer, as in unit tests) and the strategy plumbing
(which strategies work, sharded weights, gradient sync off during accumulation)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Optional

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor

from lit_rlhf.errors import ConfigError


class Ranks:
    """The collectives a PPO iteration needs, through the trainer's strategy."""

    def __init__(self, trainer: Optional[Any]) -> None:
        self.trainer = trainer

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def sum(self, values: Tensor) -> Tensor:
        """Sum of ``values`` over all ranks; ``values`` itself is left as is."""
        if self.world_size == 1:
            return values
        # the strategy reduces in place: a copy keeps the caller's tensor (and any view of it) unchanged
        return self.trainer.strategy.reduce(values.clone(), reduce_op="sum")

    def mean(self, value: Tensor) -> Tensor:
        """Mean of ``value`` over all ranks."""
        return self.sum(value) / self.world_size

    def max(self, value: int, device: torch.device) -> int:
        """The largest of every rank's ``value``."""
        if self.world_size == 1:
            return value
        return int(self.trainer.strategy.reduce(torch.tensor(float(value), device=device), reduce_op="max"))

    def max_tensor(self, value: Tensor) -> Tensor:
        """The largest of every rank's ``value`` (a tensor)."""
        if self.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value.clone(), reduce_op="max")

    def gather(self, values: Tensor) -> Tensor:
        """``values`` of every rank, flattened."""
        if self.world_size == 1:
            return values.flatten()
        return self.trainer.strategy.all_gather(values).flatten()

    def all(self, decision: bool) -> bool:
        """Whether ``decision`` holds on every rank."""
        if self.trainer is None:
            return decision
        return self.trainer.strategy.reduce_boolean_decision(decision, all=True)


def adapt_strategy(strategy: Any, ppo: Any) -> None:
    """Refuse the strategies PPO's manual optimization cannot use, and set DeepSpeed up for it (``ppo``: the
    ``PPOConfig``)."""
    if isinstance(strategy, FSDPStrategy):
        raise ConfigError(
            "trainer.strategy: FSDPStrategy (FSDP1) runs training_step inside the wrapped module's forward, "
            "where PPO's manual backward passes fail. Shard with FSDP2 instead: "
            "lightning.pytorch.strategies.ModelParallelStrategy (see recipes/llama3.1-8b-fsdp2.yaml)"
        )
    if isinstance(strategy, DeepSpeedStrategy):
        strategy.exclude_frozen_parameters = True  # checkpoints: the trained weights, not the frozen base
        # The DeepSpeed engine owns gradient accumulation and clipping: its accumulation boundary is
        # Lightning's accumulate_grad_batches (1 under manual optimization), and it clips in engine.step().
        if strategy.zero_stage_3:
            raise ConfigError(
                "trainer.strategy: DeepSpeed ZeRO stage 3 is not supported yet (it would partition the weights "
                "while they load and while the frozen reward model is used outside the engine). Use stage 2, "
                "or FSDP2 to shard weights (recipes/llama3.1-8b-fsdp2.yaml)"
            )
        if ppo.gradient_accumulation_steps > 1:
            raise ConfigError(
                "ppo.gradient_accumulation_steps > 1 is not supported with the DeepSpeed strategy: use more "
                "ppo.num_minibatches (smaller minibatches) or the FSDP/DDP strategy"
            )
        if ppo.max_grad_norm is not None:
            strategy.config.setdefault("gradient_clipping", ppo.max_grad_norm)


def parameters_are_sharded(strategy: Optional[Any]) -> bool:
    """Whether the strategy shards the weights themselves (FSDP2, DeepSpeed ZeRO-3).

    Then every forward all-gathers weights across ranks, so all ranks must keep calling the model
    during generation until the last one is done (``synced_gpus``), or the collectives hang.
    """
    if isinstance(strategy, ModelParallelStrategy):
        return True
    return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3


def no_gradient_sync(model: Any, strategy: Any) -> AbstractContextManager:
    """Skip the cross-rank gradient reduction of the next backward (accumulation micro-batches)."""
    if hasattr(model, "set_requires_gradient_sync"):  # sharded with FSDP2
        return _fsdp_gradient_sync_off(model)
    block = getattr(strategy, "block_backward_sync", None)
    return block() if block is not None else nullcontext()


@contextmanager
def _fsdp_gradient_sync_off(module: Any) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
