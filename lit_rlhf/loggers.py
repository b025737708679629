"""A CSV logger that continues a run's ``metrics.csv`` when the run resumes (Lightning's deletes it)."""

from __future__ import annotations

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep an existing ``metrics.csv``: new rows are appended to it (columns merged)."""


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger``, except that logging into an existing run folder (``--ckpt_path``) appends to
    its ``metrics.csv`` instead of deleting it, so a resumed run keeps one table of all its iterations."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
