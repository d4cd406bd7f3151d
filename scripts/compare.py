"""Compare finished runs side by side: a table of overrides and final metrics, and a plot.

    python scripts/compare.py logs/train/multiruns/<timestamp>          # a whole sweep
    python scripts/compare.py logs/train/runs/<a> logs/train/runs/<b>   # chosen runs
    python scripts/compare.py <dirs> --out reports/ --stage val

Prints a table (rich) and writes `comparison.md`, `comparison.csv` and `comparison.png`
(reconstruction quality against codebook utilization, and against bitrate when the runs log
one) into `--out`, by default the directory given (or the runs' common parent). Metrics are
the last values in each run's `csv/version_*/metrics.csv` (the CSV logger, on by default).
Columns follow what the runs logged (src/utils/run_table.py): for tokenizers quality, codebook
usage, bitrate and tokens/s; for other models their own shared metrics (e.g. a prior's nll).
The stage is `test` when every run that did not fail has test metrics, else `val`; tokens/s is
the whole-run average logged at the end of training (`summary/tokens_per_sec`), else the last
rolling `train/tokens_per_sec`; missing values are blank. A run that failed (train.py left
`failed.json`) is marked `failed` in a status column; a run without any metric (a crash before
its first validation: only train.log and .hydra) gets no row and is listed with the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# scripts/tokenize.py shares its name with the standard library's `tokenize` (which linecache,
# inspect and rich import): keep scripts/ off the import path so they find the real one
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import csv  # noqa: E402
import os  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from src.utils.compare_plot import save_comparison_plot  # noqa: E402
from src.utils.run_table import Comparison, Run, compare, find_run_dirs  # noqa: E402

NUMBER_FORMATS = {"utilization": "{:.4f}", "dead_codes": "{:.0f}", "tokens_per_sec": "{:.0f}"}


def cell(column: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return NUMBER_FORMATS.get(column, "{:.3f}").format(value)
    return str(value)


def rich_table(comparison: Comparison, title: str) -> Table:
    table = Table(title=title, caption=caption(comparison))
    for column in comparison.columns:
        numeric = column not in ("run", "status", "overrides")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for row in comparison.rows:
        table.add_row(*(cell(c, row[c]) for c in comparison.columns))
    return table


def caption(comparison: Comparison) -> str:
    common = " ".join(comparison.common_overrides) or "none"
    text = f"{comparison.stage} metrics; overrides shared by all runs: {common}"
    if comparison.left_out:
        text += f"; {len(comparison.left_out)} run(s) left out (listed below the table)"
    return text


def left_out_lines(comparison: Comparison) -> list[str]:
    """One line per run without a row: its directory and why."""
    return [f"left out {path}: {reason}" for path, reason in comparison.left_out]


def markdown(comparison: Comparison, title: str) -> str:
    lines = [f"# {title}", "", caption(comparison), ""]
    lines.append("| " + " | ".join(comparison.columns) + " |")
    lines.append("| " + " | ".join("---" for _ in comparison.columns) + " |")
    for row in comparison.rows:
        cells = (cell(c, row[c]).replace("|", "\\|") for c in comparison.columns)
        lines.append("| " + " | ".join(cells) + " |")
    if comparison.left_out:
        lines += ["", "Left out:", ""]
        lines += [f"- `{path}`: {reason}" for path, reason in comparison.left_out]
    return "\n".join(lines) + "\n"


def write_csv(comparison: Comparison, path: Path) -> None:
    """Full-precision values (repr of the floats read from metrics.csv); blank when missing."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(comparison.columns)
        for row in comparison.rows:
            writer.writerow(["" if row[c] is None else row[c] for c in comparison.columns])


def default_out_dir(inputs: list[Path], run_dirs: list[Path]) -> Path:
    if len(inputs) == 1:
        return inputs[0]
    return Path(os.path.commonpath([p.resolve() for p in run_dirs]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories")
    parser.add_argument("--out", type=Path, help="where to write comparison.{md,csv,png}")
    parser.add_argument("--stage", choices=("auto", "test", "val"), default="auto")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)

    try:
        run_dirs = find_run_dirs(args.dirs)
    except FileNotFoundError as error:
        parser.error(str(error))
    comparison = compare([Run.load(d) for d in run_dirs], stage=args.stage)
    if not comparison.rows:
        for line in left_out_lines(comparison):
            print(line, file=sys.stderr)
        print(
            f"no run to compare: none of the {len(run_dirs)} run directories logged any metric",
            file=sys.stderr,
        )
        return 1
    out = args.out or default_out_dir(args.dirs, run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    title = f"vqzoo comparison of {len(run_dirs)} runs ({', '.join(map(str, args.dirs))})"
    if len(title) > 120:
        title = f"vqzoo comparison of {len(run_dirs)} runs"

    # piped output (files, CI logs) gets a wide table instead of rich's 80-column default
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(rich_table(comparison, title))
    for line in left_out_lines(comparison):
        print(line)
    (out / "comparison.md").write_text(markdown(comparison, title))
    write_csv(comparison, out / "comparison.csv")
    written = [out / "comparison.md", out / "comparison.csv"]
    if not args.no_plot:
        try:
            written.append(save_comparison_plot(comparison, out / "comparison.png", title))
        except ValueError as error:  # nothing to plot: say why, keep the tables
            print(f"no plot: {error}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
