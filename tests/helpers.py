"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# a short but complete run: few train batches, the whole validation and test sets
QUICK = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "extras.print_config=false",
    "callbacks.model_summary=null",
]


def run_script(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run `python <script> args...` from the project root, as a user would."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics_csv(run_dir: Path) -> list[dict[str, str]]:
    """Rows of the CSV logger's metrics file of a run directory."""
    (path,) = run_dir.glob("csv/version_*/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def last_logged(rows: list[dict[str, str]], name: str) -> float:
    """The last non-empty value of a metric column."""
    values = [float(row[name]) for row in rows if row.get(name)]
    if not values:
        raise KeyError(f"{name} was never logged; columns: {sorted(rows[0])}")
    return values[-1]
