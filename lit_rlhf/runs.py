"""Run folders: everything of one run in one place, and a resume that continues that run.

A run of a recipe writes to ``<save_dir>/<name>/<version>/`` (the logger's folder: ``version_N`` for the
CSV and TensorBoard loggers, the run id for W&B): ``metrics.csv``, ``config.yaml``, ``samples.jsonl``,
``policy/`` and ``checkpoints/``. ``--ckpt_path last`` picks the newest ``last.ckpt`` of the recipe's runs
and logs into that run's folder again (and resumes its W&B run), instead of starting a new version.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
import zipfile
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


def _save_dir_argument(logger: Any) -> str:
    """The init argument of a logger that names the folder its runs go to."""
    return "dir" if logger.class_path.endswith("WandbLogger") and logger.init_args.get("dir") else "save_dir"


def _runs_folder(logger: Any, default_root_dir: str) -> tuple[Path, str]:
    """Where a logger keeps its runs (``<save_dir>/<name>``) and which init argument names a run."""
    args = logger.init_args
    if logger.class_path.endswith("WandbLogger"):
        return Path(args.get("save_dir") or args.get("dir") or ".") / str(args.get("project")), "id"
    return Path(args.get("save_dir") or default_root_dir) / str(args.get("name") or "lightning_logs"), "version"


def prepare_fit_config(config: Any) -> None:
    """Check and complete the parsed ``fit`` config before anything is built: the accelerator exists, the run's
    folder can be written, the CPU threads; the default W&B project; and for ``ckpt_path``, a complete checkpoint
    whose run folder the resumed run logs into again.

    ``ckpt_path: last`` becomes the newest ``last*.ckpt`` under the recipe's run folders.
    """
    check_accelerator(config.trainer)
    set_cpu_threads(config.get("cpu_threads"), config.trainer)
    logger = _logger_spec(config)
    if logger is not None and config.trainer.get("default_root_dir"):
        # the run's folder is the logger's: --trainer.default_root_dir moves it (instead of being ignored)
        logger.init_args[_save_dir_argument(logger)] = config.trainer.default_root_dir
    if logger is not None and logger.class_path.endswith("WandbLogger") and not logger.init_args.get("project"):
        logger.init_args.project = DEFAULT_WANDB_PROJECT
    if logger is not None:
        save_dir = logger.init_args.get(_save_dir_argument(logger)) or config.trainer.get("default_root_dir") or "."
        check_writable(save_dir, f"trainer.logger.init_args.{_save_dir_argument(logger)}")
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path:
        return
    if ckpt_path != "last" or logger is None or not _uses_run_checkpoints(config):
        if ckpt_path not in ("last", "hpc", "best", "registry"):
            check_checkpoint_file(Path(ckpt_path))
        if logger is None or not _uses_run_checkpoints(config) or ckpt_path in ("hpc", "best", "registry"):
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
        check_checkpoint_file(checkpoint)
        config.ckpt_path = str(checkpoint)
    else:
        checkpoint = Path(ckpt_path)
    if checkpoint.parent.name == "checkpoints" and checkpoint.parent.parent.parent.resolve() == runs.resolve():
        logger.init_args[run_argument] = checkpoint.parent.parent.name  # continue that run's folder and logs
        if logger.class_path == "lightning.pytorch.loggers.CSVLogger":
            logger.class_path = "lit_rlhf.loggers.CSVLogger"  # Lightning's would delete the run's metrics.csv


def check_checkpoint_file(path: Path) -> None:
    """A ``--ckpt_path`` that exists and is a whole checkpoint (a zip archive, as ``torch.save`` writes; a
    DeepSpeed checkpoint is a folder)."""
    if not path.exists():
        raise ConfigError(f"--ckpt_path {str(path)!r} does not exist")
    if path.is_dir():
        return
    if path.stat().st_size == 0 or not zipfile.is_zipfile(path):
        state = "is empty (0 bytes)" if path.stat().st_size == 0 else "is truncated or not a checkpoint"
        raise ConfigError(
            f"--ckpt_path {str(path)!r} {state}: its writing was interrupted, or it is another kind of file. Resume "
            "from another checkpoint of the run (lit-rlhf writes last.ckpt atomically), or start without --ckpt_path"
        )


def check_accelerator(trainer: Any) -> None:
    """A GPU recipe on a machine without a CUDA GPU: say which fields to change (instead of a traceback)."""
    import torch

    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU: run the recipe on a GPU machine, or "
            "here with --trainer.accelerator=cpu --trainer.precision=32-true (and small models: the GPU recipes' "
            "models are large)"
        )


def processes_per_machine(trainer: Any) -> int:
    """Training processes on this machine: ``trainer.devices`` of a CPU run (1 when it is not a count)."""
    devices = trainer.get("devices")
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)):
        return max(len(devices), 1)
    if isinstance(devices, str) and devices.isdigit():
        return max(int(devices), 1)
    return 1


def set_cpu_threads(requested: Optional[int], trainer: Any) -> int:
    """Set torch's threads for each training process: ``cpu_threads``, else ``OMP_NUM_THREADS``, else the cores
    this process may use divided by the processes per machine. Two processes each running as many threads as
    there are cores slow each other down many times (OpenMP threads spin while they wait). Says what it chose."""
    import torch
    from lightning.pytorch.utilities import rank_zero_info

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = processes_per_machine(trainer) if str(trainer.get("accelerator") or "auto") == "cpu" else 1
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"cpu_threads={requested}: give a number of threads of at least 1, or null")
        threads, why = requested, "cpu_threads"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads, why = max(int(os.environ["OMP_NUM_THREADS"]), 1), "OMP_NUM_THREADS"
    else:
        threads = max(cores // processes, 1)
        why = f"{cores} cores / {processes} process{'es' if processes > 1 else ''} on this machine"
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the processes a strategy launches do the same
    rank_zero_info(f"CPU threads per process: {threads} ({why}; change with --cpu_threads or OMP_NUM_THREADS)")
    return threads


def check_writable(folder: str, field: str) -> None:
    """The run's folder (or the first existing folder above it) takes files: else a one-line error now."""
    path = Path(folder).expanduser().absolute()
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(
            f"{field}={folder!r}: the run's files cannot be written there ({err.strerror or err}). Choose a folder "
            "you can write to (e.g. --trainer.default_root_dir=...)"
        ) from None


def recipe_error(message: str, parser: Any) -> str:
    """One line for a recipe the parser refused; for an unknown field, the closest field there is."""
    unknown = (re.search(r"unrecognized arguments: -*([\w.\-]+)", message)
               or re.search(r"does not accept option '([\w.\-]+)'", message)
               or re.search(r'No action for key "([\w.\-]+)"', message))
    if unknown:
        key, known = unknown.group(1).split("=")[0], _known_fields(parser)
        inside = re.search(r'Parser key "([\w.]+)".*class_path \'([\w.]+)\'', message, re.DOTALL)
        if inside:  # a field of a stage's class (model: {class_path, init_args})
            prefix = f"{inside.group(1)}.init_args."
            key, known = prefix + key, [prefix + name for name in _class_fields(inside.group(2))]
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown recipe field {key!r}{hint} (lit-rlhf fit --help lists every field)"
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _known_fields(parser: Any) -> list[str]:
    """The dotted field names the ``fit`` parser knows (``model.ppo.kl_coef``, ``trainer.max_epochs``, ...)."""
    action = getattr(parser, "_subcommands_action", None)
    fit = action._name_parser_map.get("fit", parser) if action is not None else parser
    return [dest for item in fit._actions if (dest := getattr(item, "dest", "")) and dest not in ("help", "config")]


def _class_fields(class_path: str) -> list[str]:
    """The dotted init fields of a stage class (``optimizer.lr``, ``policy.lora_r``, ...)."""
    import importlib

    from jsonargparse import ArgumentParser

    module, _, name = class_path.rpartition(".")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(getattr(importlib.import_module(module), name))
    return [dest for item in parser._actions if (dest := getattr(item, "dest", "")) and dest not in ("help", "config")]


def _uses_run_checkpoints(config: Any) -> bool:
    """Whether every ``ModelCheckpoint`` writes into the run folder (no ``dirpath`` of its own)."""
    for callback in config.trainer.get("callbacks") or []:
        if getattr(callback, "class_path", "").endswith("ModelCheckpoint") and callback.init_args.get("dirpath"):
            return False
    return True
