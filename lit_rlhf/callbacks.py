"""Cross-cutting extras of a run: sample tables, preemption checkpoints, atomic checkpoint files."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, fsyncs, then renames it into place.

    A crash or preemption mid-write leaves the previous checkpoint (e.g. ``last.ckpt``) intact, never a
    truncated one. ``PPOModule`` installs it in place of Lightning's default ``TorchCheckpointIO``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """The checkpoint callback's folder, else ``<log_dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"


def save_last_checkpoint(trainer: L.Trainer) -> Path:
    """Write ``last.ckpt`` in the checkpoint folder, as the checkpoint callback's own last checkpoint.

    Registering it first means ``ModelCheckpoint`` (which records this in the checkpoint) overwrites it
    after a resume instead of writing ``last-v1.ckpt`` beside it.
    """
    path = checkpoint_dir(trainer) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath and Path(callback.dirpath) == path.parent:
            callback.last_model_path = str(path)
    trainer.save_checkpoint(path)
    return path


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (cloud preemption) or SIGINT (Ctrl-C), finish the current PPO iteration, write
    ``last.ckpt`` and exit; ``lit-rlhf fit ... --ckpt_path last`` resumes from it.

    Lightning notes SIGTERM and exits right after the batch; this callback saves that finished batch's
    state first. Ctrl-C is handled the same way (a second Ctrl-C interrupts at once). The run exits
    rather than stopping normally, so no end-of-epoch checkpoint overwrites the mid-epoch position.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous_sigint = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:  # second Ctrl-C: give up on the graceful stop
            raise KeyboardInterrupt
        self.requested = True
        rank_zero_info("Interrupt received: finishing this PPO iteration, then saving a checkpoint (Ctrl-C again to abort)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not (self.requested or trainer.received_sigterm):
            return
        path = save_last_checkpoint(trainer)
        rank_zero_info(f"Saved {path}; resume with --ckpt_path {path}")
        if self.requested:
            raise KeyboardInterrupt  # Lightning's graceful shutdown; on SIGTERM Lightning raises its own

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


class SampleTable(L.Callback):
    """Every ``every_n_steps`` iterations, log a table of prompt, completion, score, KL and reward.

    To W&B as a ``wandb.Table`` (key ``samples``) when a ``WandbLogger`` is attached, and always to
    ``<log_dir>/samples.jsonl`` (one JSON object per row, with the iteration) for other loggers.
    """

    def __init__(self, every_n_steps: int = 10, max_rows: int = 8) -> None:
        if every_n_steps < 1 or max_rows < 1:
            raise ValueError("SampleTable: every_n_steps and max_rows must be >= 1")
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        samples = getattr(pl_module, "latest_samples", None)
        iteration = getattr(pl_module, "iteration", 0)  # PPO iterations done, this one included
        if not samples or (iteration - 1) % self.every_n_steps:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask, so before the rank check
        if not trainer.is_global_zero:
            return
        columns = list(samples)
        rows = [[samples[c][i] for c in columns] for i in range(min(self.max_rows, len(samples[columns[0]])))]
        directory = Path(log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "samples.jsonl", "a") as file:
            for row in rows:
                file.write(json.dumps({"iteration": iteration, **dict(zip(columns, row))}) + "\n")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_table(key="samples", columns=columns, data=rows, step=trainer.global_step)
