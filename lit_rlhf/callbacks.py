"""Cross-cutting extras of a run: sample tables, preemption checkpoints, atomic checkpoint files."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lit_rlhf.errors import ConfigError
from lit_rlhf.runs import run_directory


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
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                from lit_rlhf.errors import TrainingError

                raise TrainingError(
                    f"No space left on the device to write the checkpoint {path} ({err.strerror}): free some space or "
                    "move the run (--trainer.default_root_dir); the previous checkpoint there is intact"
                ) from err
            raise
        finally:
            temporary.unlink(missing_ok=True)


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """The checkpoint callback's folder, else the run folder's ``checkpoints/``."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath)
    return run_directory(trainer) / "checkpoints"


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
    ``last.ckpt``, log the iteration's metrics and exit; ``lit-rlhf fit ... --ckpt_path last`` resumes from it
    in the same run folder. On any other exception, write ``last.ckpt`` with the state at the failure.

    Lightning notes SIGTERM and stops right after the batch, once its metrics are logged; this callback
    saves that finished batch's state first. Ctrl-C is handled the same way (a second Ctrl-C interrupts at
    once): the stop happens at the next hook, after Lightning has logged the iteration's metrics.
    """

    interrupted = False  # a Ctrl-C stopped a run of this process (``lit-rlhf fit`` then exits 130)

    def __init__(self) -> None:
        self.requested = False
        self.saved: Optional[Path] = None
        self._previous_sigint = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested, self.saved = False, None
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
        self.saved = save_last_checkpoint(trainer)
        rank_zero_info(f"Saved {self.saved}; resume with --ckpt_path last")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._stop_if_saved(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved(trainer)

    def _stop_if_saved(self, trainer: L.Trainer) -> None:
        """After Ctrl-C: the iteration's checkpoint is written and its metrics are logged by now; flush, stop."""
        if self.requested and self.saved is not None:
            for logger in trainer.loggers:
                logger.save()
            PreemptionCheckpoint.interrupted = True
            raise KeyboardInterrupt  # Lightning's graceful shutdown

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Keep what a crashed run has learnt: ``last.ckpt`` of the state at the failure (one process only:
        under a distributed strategy the other ranks may be waiting in a collective)."""
        from lit_rlhf.errors import TrainingError

        if self.saved is not None or isinstance(exception, TrainingError) or trainer.global_step == 0:
            return  # already saved (preemption, or the last good state before non-finite updates)
        if trainer.world_size > 1:
            rank_zero_info("The run failed under a distributed strategy: no checkpoint of the failure is written")
            return
        try:
            self.saved = save_last_checkpoint(trainer)
        except Exception as err:  # never hide the original error behind a failed save
            rank_zero_info(f"Could not write a checkpoint after the failure: {err}")
            return
        rank_zero_info(
            f"The run failed; its state at the failure is in {self.saved} (resume with --ckpt_path last, or "
            f"lit-rlhf export --checkpoint {self.saved} --output_dir merged/)"
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


class RunConfig(SaveConfigCallback):
    """Writes the resolved recipe as ``config.yaml`` into the run's own folder (:func:`lit_rlhf.runs.run_directory`),
    for every logger (W&B included), and again when the run resumes. A run that fails before its first step and
    made its folder takes the folder away again (the next run gets its number, not ``version_1``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)
        self._folder: Optional[Path] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        directory = run_directory(trainer)  # a collective: every rank
        if trainer.is_global_zero:
            self._folder = directory
            directory.mkdir(parents=True, exist_ok=True)
            self.parser.save(
                self.config, str(directory / self.config_filename), skip_none=False, overwrite=True,
                multifile=self.multifile,
            )

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Unused: ``setup`` writes the file."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A new run that failed before its first optimizer step leaves no folder behind (it holds only the
        recipe): the next run takes its number, and "the newest run" stays one that trained."""
        folder = self._folder
        if folder is None or trainer.global_step > 0 or trainer.ckpt_path is not None or not folder.is_dir():
            return
        if any(path.suffix == ".ckpt" for path in folder.rglob("*")):
            return
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


class SampleTable(L.Callback):
    """Every ``every_n_steps`` iterations, log a table of prompt, completion, score, KL and reward: ``max_rows``
    rows spread over the rollout (with several completions per prompt, from different prompts).

    To W&B as a ``wandb.Table`` (key ``samples``) when a ``WandbLogger`` is attached, and always to
    ``samples.jsonl`` in the run's folder (one JSON object per row, with the iteration) for other loggers.
    """

    def __init__(self, every_n_steps: int = 10, max_rows: int = 8) -> None:
        if every_n_steps < 1 or max_rows < 1:
            raise ConfigError("SampleTable: every_n_steps and max_rows must be >= 1")
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        samples = getattr(pl_module, "latest_samples", None)
        iteration = getattr(pl_module, "iteration", 0)  # PPO iterations done, this one included
        if not samples or (iteration - 1) % self.every_n_steps:
            return
        directory = run_directory(trainer)  # a collective under DDP: every rank must ask, so before the rank check
        if not trainer.is_global_zero:
            return
        columns = list(samples)
        count = len(samples[columns[0]])
        # rows spread over the batch: one per group of a prompt's completions (GRPO), not one group's all
        picked = range(0, count, max(count // self.max_rows, 1))[: self.max_rows]
        rows = [[samples[c][i] for c in columns] for i in picked]
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "samples.jsonl", "a") as file:
            for row in rows:
                file.write(json.dumps({"iteration": iteration, **dict(zip(columns, row))}) + "\n")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_table(key="samples", columns=columns, data=rows, step=trainer.global_step)


class ProgressLog(L.Callback):
    """One line every ``every_n_steps`` PPO iterations (and after the first) when stdout is not a terminal.

    Runs whose output goes to a file (SLURM, ``docker logs``, ``nohup``) see no progress bar; this prints the
    iteration, epoch, score, KL, losses and the pace instead. On a terminal it stays quiet unless ``always``.
    """

    METRICS = (("objective/scores", "score"), ("objective/kl", "kl"), ("kl_coef", "kl_coef"),
               ("loss/policy_avg", "policy_loss"), ("loss/value_avg", "value_loss"), ("val/distinct_2", "distinct_2"))

    def __init__(self, every_n_steps: int = 10, always: bool = False) -> None:
        if every_n_steps < 1:
            raise ConfigError("ProgressLog: every_n_steps must be >= 1")
        self.every_n_steps, self.always = every_n_steps, always
        self._last: Optional[tuple[float, int]] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = (time.perf_counter(), getattr(pl_module, "iteration", 0))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        iteration = getattr(pl_module, "iteration", 0)
        if iteration != 1 and iteration % self.every_n_steps:
            return
        if not trainer.is_global_zero or not (self.always or not sys.stdout.isatty()):
            return
        now = time.perf_counter()
        started, before = self._last or (now, iteration - 1)
        self._last = (now, iteration)
        values = trainer.callback_metrics
        parts = [f"{label} {float(values[name]):.4g}" for name, label in self.METRICS if name in values]
        pace = (now - started) / max(iteration - before, 1)
        print(f"iteration {iteration} (epoch {trainer.current_epoch}): {', '.join(parts)}; {pace:.2f} s/iteration",
              flush=True)
