"""A CSV logger that continues a run's ``metrics.csv`` when the run resumes (Lightning's deletes it)."""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingExperimentWriter(ExperimentWriter):
    """Appends to an existing ``metrics.csv``; rows of steps that a resumed run does again are replaced."""

    def _check_log_dir_exists(self) -> None:
        """Keep an existing ``metrics.csv``: its columns stay, new rows are appended to it."""
        self._continues_file = self._fs.isfile(self.metrics_file_path)

    def save(self) -> None:
        if self._continues_file and self.metrics:
            self._drop_rows_from(min(int(row["step"]) for row in self.metrics))
            self._continues_file = False
        super().save()

    def _drop_rows_from(self, step: int) -> None:
        """Remove the rows of ``step`` and later: a run resumed from a checkpoint does those iterations again, and
        the rows of the stopped run (a crash after its last checkpoint) would stand twice."""
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            columns = list(reader.fieldnames or [])
            rows = [row for row in reader if not row.get("step") or int(float(row["step"])) < step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(set(self.metrics_keys) | set(columns))


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger``, except that logging into an existing run folder (``--ckpt_path``) continues
    its ``metrics.csv`` instead of deleting it: a resumed run keeps one table of all its iterations, each once
    (the rows of iterations done again after a crash replace the lost run's)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
