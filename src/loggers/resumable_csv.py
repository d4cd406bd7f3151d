"""A CSV logger that a resumed run continues: same `csv/version_0/metrics.csv`, appended to.

Lightning's CSVLogger deletes an existing metrics.csv when it opens its directory again, and
picks a new version directory by default. This one keeps the file and its columns. On resume,
`roll_back(step)` moves the rows logged after the checkpoint (by the attempt that was
killed, and about to be logged again) to `metrics.rolled_back.csv` beside it, so metrics.csv
reads like the log of a run that was never stopped and nothing written is lost.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

ROLLED_BACK_FILE = "metrics.rolled_back.csv"


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, minus the deletion of an existing metrics file."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = sorted(set(header))


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` writing `<save_dir>/<name>/version_<version>/metrics.csv`, version 0 by default,
    appending to the file a previous attempt of the same run left."""

    def __init__(
        self, save_dir: str | Path, name: str = "csv", version: int | str = 0, **kwargs: Any
    ):
        super().__init__(save_dir=save_dir, name=name, version=version, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def roll_back(self, step: int) -> int:
        """Set aside what was logged after a checkpoint of global step ``step``: rows with a
        logged step >= ``step`` (Lightning logs the batch that makes global step s+1 at step s)
        move to metrics.rolled_back.csv. Returns how many rows moved."""
        path = Path(self.log_dir) / AppendingExperimentWriter.NAME_METRICS_FILE
        if not path.is_file():
            return 0
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
        kept = [row for row in rows if not _after(row, step)]
        moved = [row for row in rows if _after(row, step)]
        if not moved:
            return 0
        side = path.with_name(ROLLED_BACK_FILE)
        side_exists = side.is_file()
        with side.open("a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fields, extrasaction="ignore")
            if not side_exists:
                writer.writeheader()
            writer.writerows(moved)
        partial = path.with_name(f".{path.name}.partial")
        with partial.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(partial, path)
        return len(moved)


def _after(row: dict[str, str], step: int) -> bool:
    value = row.get("step") or ""
    try:
        return int(float(value)) >= step
    except ValueError:
        return False
