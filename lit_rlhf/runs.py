"""Run folders: everything of one run in one place, and a resume that continues that run.

A run of a recipe writes to ``<save_dir>/<name>/<version>/`` (the logger's folder: ``version_N`` for the
CSV and TensorBoard loggers, the run id for W&B): ``metrics.csv``, ``config.yaml``, ``samples.jsonl``,
``policy/`` and ``checkpoints/``. ``--ckpt_path last`` picks the newest ``last.ckpt`` of the recipe's runs
and logs into that run's folder again (and resumes its W&B run), instead of starting a new version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lit_rlhf.errors import ConfigError

DEFAULT_WANDB_PROJECT = "lit-rlhf"


def run_directory(trainer: Any) -> Path:
    """This run's folder: ``<save_dir>/<name>/<version>`` of the first logger, as ``ModelCheckpoint`` resolves it.

    A collective under distributed strategies (rank 0 decides, every rank must call).
    """
    if not trainer.loggers:
        path = Path(trainer.default_root_dir)
    else:
        logger = trainer.loggers[0]
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        path = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version
    return Path(trainer.strategy.broadcast(str(path)))


def _logger_spec(config: Any) -> Optional[Any]:
    """The first logger's ``class_path``/``init_args`` namespace of a parsed ``fit`` config, if any."""
    logger = config.trainer.logger
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    return logger if getattr(logger, "class_path", None) else None


def _runs_folder(logger: Any, default_root_dir: str) -> tuple[Path, str]:
    """Where a logger keeps its runs (``<save_dir>/<name>``) and which init argument names a run."""
    args = logger.init_args
    if logger.class_path.endswith("WandbLogger"):
        return Path(args.get("save_dir") or args.get("dir") or ".") / str(args.get("project")), "id"
    return Path(args.get("save_dir") or default_root_dir) / str(args.get("name") or "lightning_logs"), "version"


def prepare_fit_config(config: Any) -> None:
    """Default W&B project; and for ``ckpt_path``, log into the checkpoint's own run folder.

    ``ckpt_path: last`` becomes the newest ``last*.ckpt`` under the recipe's run folders. Modifies the parsed
    ``fit`` config before the trainer is built.
    """
    logger = _logger_spec(config)
    if logger is not None and logger.class_path.endswith("WandbLogger") and not logger.init_args.get("project"):
        logger.init_args.project = DEFAULT_WANDB_PROJECT
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path or logger is None or not _uses_run_checkpoints(config):
        return  # Lightning's own resolution (a checkpoint folder given in the recipe)
    runs, run_argument = _runs_folder(logger, config.trainer.get("default_root_dir") or ".")
    if ckpt_path == "last":
        candidates = sorted(runs.glob("*/checkpoints/last*.ckpt"), key=lambda path: path.stat().st_mtime)
        if not candidates:
            raise ConfigError(
                f"--ckpt_path last: no checkpoint of this recipe's runs under {runs}/*/checkpoints/; give a path "
                "with --ckpt_path, or start without it"
            )
        checkpoint = candidates[-1]
        config.ckpt_path = str(checkpoint)
    else:
        checkpoint = Path(ckpt_path)
        if not checkpoint.exists():
            raise ConfigError(f"--ckpt_path {ckpt_path!r} does not exist")
    if checkpoint.parent.name == "checkpoints" and checkpoint.parent.parent.parent.resolve() == runs.resolve():
        logger.init_args[run_argument] = checkpoint.parent.parent.name  # continue that run's folder and logs
        if logger.class_path == "lightning.pytorch.loggers.CSVLogger":
            logger.class_path = "lit_rlhf.loggers.CSVLogger"  # Lightning's would delete the run's metrics.csv


def _uses_run_checkpoints(config: Any) -> bool:
    """Whether every ``ModelCheckpoint`` writes into the run folder (no ``dirpath`` of its own)."""
    for callback in config.trainer.get("callbacks") or []:
        if getattr(callback, "class_path", "").endswith("ModelCheckpoint") and callback.init_args.get("dirpath"):
            return False
    return True
