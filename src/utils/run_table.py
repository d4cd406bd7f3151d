"""Collect finished runs into one comparison table: each run's Hydra overrides and the final
values of the metrics that compare tokenizers (read from the CSV logger's metrics.csv)."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# table column -> metric names, the first one a run logged wins (`{stage}` is the stage
# compared: test, else val). tokens/s: the whole-run average logged at the end of fit, else (a
# run stopped before its end) the last rolling value.
METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "psnr": ("{stage}/psnr",),
    "si_snr": ("{stage}/si_snr",),
    "utilization": ("{stage}/codebook/utilization",),
    "perplexity": ("{stage}/codebook/perplexity",),
    "dead_codes": ("{stage}/codebook/dead_codes",),
    "bitrate_kbps": ("{stage}/bitrate_kbps",),
    "tokens_per_sec": ("summary/tokens_per_sec", "train/tokens_per_sec"),
}
QUALITY_COLUMNS = ("psnr", "si_snr")  # shown only when some run logged them


@dataclass
class Run:
    """One run directory: its overrides and the last logged value of every metric."""

    path: Path
    overrides: list[str]
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Run:
        return cls(Path(path), read_overrides(path), read_final_metrics(path))


@dataclass
class Comparison:
    """The table: one row per run, `columns` in order, None where a run lacks a value."""

    stage: str
    columns: list[str]
    rows: list[dict[str, object]]
    common_overrides: list[str]


def is_run_dir(path: Path) -> bool:
    return (path / ".hydra" / "overrides.yaml").is_file() or any(
        path.glob("csv/version_*/metrics.csv")
    )


def find_run_dirs(paths: Iterable[Path | str]) -> list[Path]:
    """Run directories among `paths`: each path is a run directory or holds some (a multirun
    directory, searched recursively; numbered jobs in numeric order)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"not a directory: {path}")
        if is_run_dir(path):
            found.append(path)
            continue
        inside = sorted(
            {p.parent.parent for p in path.rglob(".hydra/overrides.yaml")}
            | {p.parents[2] for p in path.rglob("csv/version_*/metrics.csv")},
            key=_natural_key,
        )
        if not inside:
            raise FileNotFoundError(
                f"no run directories under {path} (a run directory has .hydra/overrides.yaml "
                "or csv/version_*/metrics.csv): give a run or multirun directory of train.py"
            )
        found += inside
    return list(dict.fromkeys(found))


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides Hydra stored for the run (empty if none were stored)."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [str(item) for item in yaml.safe_load(path.read_text()) or []]


def read_final_metrics(run_dir: Path) -> dict[str, float]:
    """The last non-empty value of every column of the run's metrics.csv (newest version)."""
    files = sorted(Path(run_dir).glob("csv/version_*/metrics.csv"), key=_natural_key)
    if not files:
        return {}
    final: dict[str, float] = {}
    with files[-1].open(newline="") as f:
        for row in csv.DictReader(f):
            for name, value in row.items():
                if value not in (None, ""):
                    final[name] = float(value)
    return final


def compare(runs: Sequence[Run], stage: str = "auto") -> Comparison:
    """One row per run with the overrides that differ between runs and the final metrics.

    `stage="auto"` compares test metrics when every run has them, validation otherwise.
    """
    if stage == "auto":
        has_test = all(any(k.startswith("test/") for k in run.metrics) for run in runs)
        stage = "test" if runs and has_test else "val"
    common = _common_overrides(runs)
    columns = ["run", "overrides"]
    for column in METRIC_COLUMNS:
        present = any(metric_value(run, column, stage) is not None for run in runs)
        if column not in QUALITY_COLUMNS or present:
            columns.append(column)
    rows = []
    for run in runs:
        row: dict[str, object] = {
            "run": run.path.name,
            "overrides": " ".join(o for o in run.overrides if o not in common),
        }
        for column in columns[2:]:
            value = metric_value(run, column, stage)
            row[column] = value if value is None or math.isfinite(value) else None
        rows.append(row)
    return Comparison(stage, columns, rows, common)


def metric_value(run: Run, column: str, stage: str) -> float | None:
    """The run's final value for a table column: its first metric name the run logged."""
    for template in METRIC_COLUMNS[column]:
        name = template.format(stage=stage)
        if name in run.metrics:
            return run.metrics[name]
    return None


def label(row: dict[str, object]) -> str:
    """How a run is named in plots: its distinguishing overrides, else its directory."""
    return str(row["overrides"] or row["run"])


def _common_overrides(runs: Sequence[Run]) -> list[str]:
    if len(runs) < 2:
        return []
    shared = set(runs[0].overrides).intersection(*(run.overrides for run in runs[1:]))
    return [o for o in runs[0].overrides if o in shared]


def _natural_key(path: Path) -> list[object]:
    """Sort key that puts job 2 before job 10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in Path(path).parts]
