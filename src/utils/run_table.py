"""Collect finished runs into one comparison table: each run's Hydra overrides and the final
values of its metrics (read from the CSV logger's metrics.csv).

Columns come from what the runs logged: the known metrics below in their order (the tokenizer
table: quality, codebook usage, bitrate, tokens/s), then every other final `<stage>/<name>` and
`sample/<name>` metric that all compared runs share (a prior's nll, bits_per_token, ...), losses
left out. Runs that failed (train.py's `failed.json`) are marked `failed` and do not decide the
stage; runs without any metric are left out of the rows, each with the reason.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from src.utils.run_status import read_failure

# table column -> metric names, the first one a run logged wins (`{stage}` is the stage
# compared: test, else val). tokens/s: the whole-run average logged at the end of fit, else (a
# run stopped before its end) the last rolling value.
METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "psnr": ("{stage}/psnr",),
    "ssim": ("{stage}/ssim",),
    "si_snr": ("{stage}/si_snr",),
    "utilization": ("{stage}/codebook/utilization",),
    "perplexity": ("{stage}/codebook/perplexity",),
    "dead_codes": ("{stage}/codebook/dead_codes",),
    "bitrate_kbps": ("{stage}/bitrate_kbps",),
    "tokens_per_sec": ("summary/tokens_per_sec", "train/tokens_per_sec"),
    # the prior stage of a two-stage run (<run>/prior): bits per image, sample quality, and the
    # FD of the tokenizer's reconstructions (the floor a prior on these codes can reach)
    "prior_bits_per_image": ("prior/{stage}/bits_per_sample",),
    "sample_class_accuracy": ("prior/sample/class_accuracy",),
    "sample_fd": ("prior/sample/fd",),
    "recon_fd_floor": ("prior/sample/fd_reconstructions",),
}
PRIOR_DIR = "prior"  # src/utils/two_stage.py
PRIOR_COLUMNS = ("prior_bits_per_image", "sample_class_accuracy", "sample_fd", "recon_fd_floor")
QUALITY_COLUMNS = ("psnr", "ssim", "si_snr")  # shown only when some run logged them
# shown for runs with codebooks (some run logged `<stage>/codebook/...`, PSNR or SI-SNR)
CODEBOOK_COLUMNS = ("utilization", "perplexity", "dead_codes", "bitrate_kbps")
# columns placed before the shared metrics that are not known here (then the codebook columns)
LEADING_COLUMNS = QUALITY_COLUMNS
# where the shared metrics that no known column covers are looked for (besides `<stage>/`)
EXTRA_PREFIXES = ("sample/",)
# known metrics kept out of the table, so the tokenizer table stays as it was (the runs'
# metrics.csv has them): the audio mel distance and the count of non-finite latent tokens (a
# health counter, 0 in a sound run); names ending in "loss" are left out too
NOT_COMPARED = frozenset({"mel_distance", "nonfinite_tokens"})
FAILED = "failed"


@dataclass
class Run:
    """One run directory: its overrides, the last logged value of every metric, and the error
    it failed with (None unless train.py recorded a failure)."""

    path: Path
    overrides: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    failure: str | None = None

    @classmethod
    def load(cls, path: Path) -> Run:
        record = read_failure(path)
        failure = str(record.get("error") or "failed") if record else None
        metrics = read_final_metrics(path)
        # a two-stage run (experiment=mnist_two_stage) holds its prior's run in <run>/prior
        prior = read_final_metrics(Path(path) / PRIOR_DIR)
        metrics.update({f"{PRIOR_DIR}/{name}": value for name, value in prior.items()})
        return cls(Path(path), read_overrides(path), metrics, failure)

    @property
    def status(self) -> str:
        return "ok" if self.failure is None else FAILED


@dataclass
class Comparison:
    """The table: one row per run with metrics, `columns` in order, None where a run lacks a
    value; `left_out`: (run directory, reason) of the runs without any metric."""

    stage: str
    columns: list[str]
    rows: list[dict[str, object]]
    common_overrides: list[str]
    left_out: list[tuple[str, str]] = field(default_factory=list)


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
    # the prior stage of a two-stage run is read with its run (Run.load), not as a row
    runs = set(found)
    found = [p for p in found if not (p.name == PRIOR_DIR and p.parent in runs)]
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
    """One row per run that logged metrics, with the overrides that differ between them and
    their final metrics; runs without metrics are listed in `left_out` with the reason.

    `stage="auto"` compares test metrics when every run that did not fail has them, validation
    otherwise. Failed runs get a `status` column (shown only when some run failed).
    """
    shown = [run for run in runs if run.metrics]
    left_out = [(str(run.path), left_out_reason(run)) for run in runs if not run.metrics]
    finished = [run for run in shown if run.failure is None] or shown
    if stage == "auto":
        has_test = all(any(k.startswith("test/") for k in run.metrics) for run in finished)
        stage = "test" if finished and has_test else "val"
    common = _common_overrides(shown)
    columns = ["run"]
    if any(run.failure is not None for run in shown):
        columns.append("status")
    columns.append("overrides")
    sources = metric_columns(shown, finished, stage)
    columns += list(sources)
    rows = []
    for run in shown:
        row: dict[str, object] = {
            "run": run.path.name,
            "status": run.status,
            "overrides": " ".join(o for o in run.overrides if o not in common),
        }
        for column in columns:
            if column in row:
                continue
            value = metric_value(run, sources[column], stage)
            row[column] = value if value is None or math.isfinite(value) else None
        rows.append({column: row[column] for column in columns})
    return Comparison(stage, columns, rows, common, left_out)


def left_out_reason(run: Run) -> str:
    """Why a run without metrics has no row."""
    if run.failure is not None:
        return f"{FAILED}: {run.failure}"
    return (
        "no metrics logged (no csv/version_*/metrics.csv rows: it stopped before its first "
        "validation, is still starting, or ran without the CSV logger; see its train.log)"
    )


def metric_columns(
    shown: Sequence[Run], finished: Sequence[Run], stage: str
) -> dict[str, tuple[str, ...]]:
    """The metric columns in order, each with the metric names it reads: known quality metrics
    that some run logged, the metrics all finished runs share that no known column covers, then
    (runs with codebooks) the codebook columns, then tokens/s."""

    def present(column: str) -> bool:
        return any(metric_value(run, METRIC_COLUMNS[column], stage) is not None for run in shown)

    leading = [c for c in LEADING_COLUMNS if present(c)]
    has_codebooks = bool(leading) or any(
        "/codebook/" in name for run in shown for name in run.metrics
    )
    priors = [c for c in PRIOR_COLUMNS if present(c)]
    trailing = [*(CODEBOOK_COLUMNS if has_codebooks else ()), *priors, "tokens_per_sec"]
    extras = shared_extra_metrics(finished, stage)
    taken = set(leading) | set(trailing)
    columns = {column: METRIC_COLUMNS[column] for column in leading}
    for name in extras:
        columns[extra_column(name, taken)] = (name,)
    columns.update((column, METRIC_COLUMNS[column]) for column in trailing)
    return columns


def shared_extra_metrics(runs: Sequence[Run], stage: str) -> list[str]:
    """Final `<stage>/<name>` and `sample/<name>` metrics every run logged, that no known column
    reads, losses and NOT_COMPARED left out: `<stage>/...` names first, each group sorted."""
    if not runs:
        return []
    known = {t.format(stage=stage) for templates in METRIC_COLUMNS.values() for t in templates}
    shared = set(runs[0].metrics).intersection(*(run.metrics for run in runs[1:]))
    found = []
    for prefix in (f"{stage}/", *EXTRA_PREFIXES):
        for name in sorted(shared):
            short = name[len(prefix) :] if name.startswith(prefix) else ""
            if not short or "/" in short or name in known:
                continue
            if short.endswith("loss") or short in NOT_COMPARED:
                continue
            found.append(name)
    return found


def extra_column(name: str, taken: set[str]) -> str:
    """A shared metric's column: its name without the stage or `sample/` prefix, unless another
    column has that name already (then the full metric name)."""
    short = name.split("/", 1)[1]
    column = short if short not in taken else name
    taken.add(column)
    return column


def metric_value(run: Run, templates: Sequence[str], stage: str) -> float | None:
    """The run's final value for a column: the first of its metric names the run logged."""
    for template in templates:
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
