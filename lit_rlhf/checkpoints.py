"""Checkpoint helpers of ``PPOModule``: resuming an epoch cut short, and telling whether a checkpoint
was written by the same recipe."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

# Model sections that define the trained weights: a checkpoint of other ones cannot be resumed.
_MODEL_SECTIONS_THAT_MUST_MATCH = ("policy", "reward", "reference")


def resume_cut_epoch_mid_epoch(loops: dict[str, Any], batches_per_epoch: float) -> None:
    """Make a checkpoint written at the end of an epoch cut short (``trainer.max_steps``) resume mid-epoch.

    Lightning ends the epoch loop when ``max_steps`` is reached and calls the epoch-end hooks, where
    ``ModelCheckpoint`` saves with the epoch counted as processed. Resumed, Lightning would then start the
    next epoch and the rest of the cut one would never run. Counting the epoch as not yet processed makes
    Lightning resume inside it, where the data module continues from the next unused prompt.
    """
    fit_loop = loops.get("fit_loop", {})
    epoch, batches = fit_loop.get("epoch_progress"), fit_loop.get("epoch_loop.batch_progress")
    if not epoch or not batches:
        return
    inside_epoch_end = epoch["current"]["processed"] == epoch["current"]["completed"] + 1
    cut_short = not batches["is_last_batch"] and batches["current"]["completed"] < batches_per_epoch
    if inside_epoch_end and cut_short:
        for progress in (epoch["total"], epoch["current"]):
            progress["processed"] -= 1


# What decides which prompts a resumed run sees next and how they are encoded.
_DATA_FIELDS_THAT_MUST_MATCH = (
    "path", "prompt_field", "split", "batch_size", "max_prompt_length", "truncate_prompts", "apply_chat_template",
    "shuffle", "seed",
)


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
    saved_model: dict[str, Any], model: dict[str, Any], saved_data: dict[str, Any], data: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """What differs between a checkpoint's recipe and this run's: ``(must match, may change)`` lines of
    ``field: old -> new``. Fields the checkpoint does not know (added since) are ignored."""
    refuse: list[str] = []
    warn: list[str] = []
    for section, value in model.items():
        if section in saved_model:
            target = refuse if section in _MODEL_SECTIONS_THAT_MUST_MATCH else warn
            target += differences(f"model.{section}", plain(saved_model[section]), plain(value))
    if data and saved_data:
        for field in _DATA_FIELDS_THAT_MUST_MATCH:
            before, now = saved_data.get(field), data.get(field)
            if field == "path" and before and now:
                before, now = os.path.abspath(before), os.path.abspath(now)
            if before != now:
                refuse.append(f"data.{field}: {before!r} -> {now!r}")
    return refuse, warn


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
