"""Checkpoint helpers shared by the stages: resuming an epoch cut short, telling whether a checkpoint was
written by the same recipe, the random state, and recipes as plain data."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterable
from typing import Any, Optional, TypeVar

import torch
from torch import nn

from lit_rlhf.errors import ConfigError

ConfigT = TypeVar("ConfigT")


def resume_cut_epoch_mid_epoch(loops: dict[str, Any], batches_per_epoch: float) -> None:
    """Make a checkpoint written when ``trainer.max_steps`` cut an epoch short resume inside that epoch.

    Lightning ends the epoch loop when ``max_steps`` is reached, and the checkpoint is written either in the
    epoch-end hooks (the epoch counted as processed) or when training ends (``save_last``: counted as completed
    too). Resumed, Lightning would then start the next epoch and the rest of the cut one would never run.
    Counting the epoch as not yet processed (nor completed) makes Lightning resume inside it, where the data
    module continues from the next unused batch.
    """
    fit_loop = loops.get("fit_loop", {})
    epoch, batches = fit_loop.get("epoch_progress"), fit_loop.get("epoch_loop.batch_progress")
    if not epoch or not batches:
        return
    if batches["is_last_batch"] or batches["current"]["completed"] >= batches_per_epoch:
        return  # the epoch really ended
    current = epoch["current"]
    if current["processed"] == current["completed"] + 1:  # written in the epoch-end hooks
        counts = ("processed",)
    elif current["processed"] == current["completed"] == current["started"] > 0:  # written when training ended
        counts = ("processed", "completed")
    else:
        return
    for progress in (epoch["total"], epoch["current"]):
        for count in counts:
            progress[count] -= 1


def forget_unfinished_batch(loops: dict[str, Any]) -> bool:
    """Make a checkpoint written in the middle of a training batch (a crash) look written after the batch before.

    The batch that failed left nothing in the state, and the resumed run does it again from its start: counted
    as started, it would make Lightning take the resumed run for one that had saved before its step counter
    moved, and log every later iteration one step too far (a gap in ``step``).
    """
    batches = loops.get("fit_loop", {}).get("epoch_loop.batch_progress")
    if not batches or batches["total"]["started"] == batches["total"]["processed"]:
        return False
    for progress in (batches["total"], batches["current"]):
        progress["ready"] = progress["started"] = progress["processed"]
    return True


def differences(prefix: str, before: Any, now: Any) -> list[str]:
    """``field: old -> new`` for every leaf that differs between two (nested) dicts; a field ``before`` lacks
    (one added to the configs since the checkpoint was written) does not count."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [line for key in sorted(before)
                for line in differences(f"{prefix}.{key}", before[key], now.get(key))]
    return [] if before == now else [f"{prefix}: {before!r} -> {now!r}"]


def plain(value: Any) -> Any:
    """``value`` with tuples turned into lists (recursively), for YAML that ``yaml.safe_load`` reads."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def recipe_changes(
    saved_model: dict[str, Any], model: dict[str, Any], saved_data: dict[str, Any], data: dict[str, Any],
    model_sections: Iterable[str], data_fields: Iterable[str],
) -> tuple[list[str], list[str]]:
    """What differs between a checkpoint's recipe and this run's: ``(must match, may change)`` lines of
    ``field: old -> new``. ``model_sections`` (the models and what defines the trained weights) and ``data_fields``
    (what decides which rows a resumed run sees next) must match. Fields the checkpoint does not know (added
    since) are ignored."""
    refuse: list[str] = []
    warn: list[str] = []
    model_sections = set(model_sections)
    for section, value in model.items():
        if section in saved_model:
            target = refuse if section in model_sections else warn
            target += differences(f"model.{section}", plain(saved_model[section]), plain(value))
    if data and saved_data:
        for field in data_fields:
            before, now = saved_data.get(field), data.get(field)
            if field in ("path", "val_path") and before and now:
                before, now = os.path.abspath(before), os.path.abspath(now)
            if before != now:
                refuse.append(f"data.{field}: {before!r} -> {now!r}")
    return refuse, warn


def check_resumable(checkpoint: dict[str, Any], module: Any) -> list[str]:
    """Refuse a checkpoint of another recipe (``module.MODEL_SECTIONS_THAT_MUST_MATCH``, the data module's
    ``FIELDS_THAT_MUST_MATCH``) or one that lacks some of this run's trained weights; return the changed settings
    that may change (``field: old -> new``)."""
    trainer = module._trainer
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    refuse, warn = recipe_changes(
        checkpoint.get("hyper_parameters") or {}, dict(module.hparams),
        checkpoint.get("datamodule_hyper_parameters") or {}, dict(datamodule.hparams) if datamodule else {},
        module.MODEL_SECTIONS_THAT_MUST_MATCH, getattr(datamodule, "FIELDS_THAT_MUST_MATCH", ()),
    )
    if refuse:
        raise ConfigError(
            f"The checkpoint (--ckpt_path) was written by a run of another recipe: {'; '.join(refuse)}. Resume "
            "with the recipe that wrote it, or start a new run without --ckpt_path"
        )
    expected = set(module.state_dict())
    if "state_dict" in checkpoint:
        found = set(checkpoint["state_dict"])
    elif "trained_weights" in checkpoint:  # a strategy (FSDP2, DeepSpeed) loads the weights itself
        found = set(checkpoint["trained_weights"])
    else:
        return warn
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ConfigError(
            f"The checkpoint does not hold this run's trained weights: {len(missing)} missing (e.g. "
            f"{missing[:3]}), {len(unexpected)} not in this run (e.g. {unexpected[:3]}). Resume with the recipe "
            "that wrote it (same model, LoRA rank and target modules)"
        )
    return warn


def rng_states() -> dict[str, Any]:
    """Torch's (CPU and CUDA) and Python's random states, for a resumed run to sample what the uninterrupted
    one would have."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def restore_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def as_config(cls: type[ConfigT], value: Any) -> ConfigT:
    """``value`` as the dataclass ``cls``: as is, or built from the plain dict a checkpoint stores."""
    return cls(**value) if isinstance(value, dict) else value


def plain_hyperparameters(**values: Any) -> dict[str, Any]:
    """Hyper-parameters as plain data (dataclasses as dicts, tuples as lists): checkpoints load with
    ``torch.load(weights_only=True)`` and ``hparams.yaml`` with ``yaml.safe_load``."""
    return {name: plain(dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for name, v in values.items()}


class TrainedWeightsOnly(nn.Module):
    """A module whose state dict holds the weights it trains (``requires_grad``) and nothing else.

    The frozen base comes from its checkpoint: checkpoints (of every strategy) neither hold nor gather it.
    Selected by the state dict's own tensors, so wrapper prefixes in parameter names cannot drop a trained
    weight.
    """

    def state_dict(self, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict[str, Any]:
        everything = super().state_dict(prefix=prefix, keep_vars=True)
        trained = {
            name: value if keep_vars else value.detach()
            for name, value in everything.items() if isinstance(value, nn.Parameter) and value.requires_grad
        }
        if destination is not None:
            destination.update(trained)
            return destination
        return trained


class ExactResume(TrainedWeightsOnly):
    """LightningModule hooks for checkpoints that resume exactly where a run stopped (``max_steps``, SIGTERM,
    a periodic checkpoint before a crash): the trained weights, the random state (of the start of the batch that
    failed, after a crash), and loop counters that make Lightning continue inside a cut epoch.

    A resume refuses a checkpoint of another recipe (``MODEL_SECTIONS_THAT_MUST_MATCH`` and the data module's
    ``FIELDS_THAT_MUST_MATCH``) and applies the rest of the recipe as it is now, the optimizer's settings and
    schedule included (``optimizer_config``). Subclasses extend ``on_save_checkpoint``/``on_load_checkpoint``.
    """

    MODEL_SECTIONS_THAT_MUST_MATCH: tuple[str, ...] = ()
    _batch_start_rng: Optional[dict[str, Any]] = None
    _resumed_with_changes: list[str] = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start_rng = rng_states()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the names of the trained weights, so that a resume can tell whether the checkpoint holds all of them
        # even where a strategy loads the weights itself (FSDP2, DeepSpeed) and hands us only the metadata
        checkpoint["trained_weights"] = sorted(self.state_dict())
        random_state = rng_states()
        if "loops" in checkpoint and self._trainer is not None:
            if forget_unfinished_batch(checkpoint["loops"]) and self._batch_start_rng is not None:
                random_state = self._batch_start_rng  # the failed batch is done again, as it was first begun
            resume_cut_epoch_mid_epoch(checkpoint["loops"], self.trainer.num_training_batches)
        checkpoint["rng_states"] = random_state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_with_changes = check_resumable(checkpoint, self)
        if "rng_states" in checkpoint:  # the resumed run samples exactly what the uninterrupted one would
            restore_rng_states(checkpoint["rng_states"])

    def on_train_start(self) -> None:
        """The optimizer's settings and schedule (of the run's length as it is now) apply, from the resumed step
        on after a resume; the settings that changed are announced."""
        from lit_rlhf.configs import apply_optimizer_config

        trainer = self.trainer
        apply_optimizer_config(trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler, self.optimizer_config)
        if self._resumed_with_changes:
            import warnings

            step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the metrics' step of the next row
            warnings.warn(f"Resuming with changed settings, applied from step {step} on: "
                          f"{'; '.join(self._resumed_with_changes)}", UserWarning, stacklevel=2)
            self._resumed_with_changes = []
