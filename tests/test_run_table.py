"""src/utils/run_table.py and compare_plot.py on hand-written run directories: which runs are
found, which values and stage are compared, what the plot draws."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from src.utils.compare_plot import comparison_figure
from src.utils.run_status import FAILED_MARKER, read_failure, record_failure
from src.utils.run_table import Run, compare, find_run_dirs
from tests.helpers import run_script


def make_run(path: Path, overrides: list[str], rows: list[dict[str, float]]) -> Path:
    """A run directory as train.py leaves it: .hydra/overrides.yaml and a CSV logger file."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    metrics = path / "csv" / "version_0" / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    names = sorted({name for row in rows for name in row})
    with metrics.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
    return path


def audio_rows(si_snr: float, utilization: float, bitrate: float) -> list[dict[str, float]]:
    return [
        {"val/si_snr": si_snr - 1, "val/codebook/utilization": 0.1, "step": 1},
        {"train/tokens_per_sec": 900.0, "step": 2},
        {
            "val/si_snr": si_snr,
            "val/codebook/utilization": utilization,
            "val/bitrate_kbps": bitrate,
            "step": 3,
        },
    ]


def test_jobs_are_found_in_numeric_order(tmp_path: Path) -> None:
    for job in ("10", "2", "1"):
        make_run(tmp_path / "sweep" / job, [f"seed={job}"], [{"val/psnr": 1.0}])
    (tmp_path / "sweep" / "multirun.yaml").write_text("{}\n")
    assert [p.name for p in find_run_dirs([tmp_path / "sweep"])] == ["1", "2", "10"]
    with pytest.raises(FileNotFoundError, match="no run directories under"):
        find_run_dirs([tmp_path / "sweep" / "1" / "csv" / "version_0"])


def test_last_values_varying_overrides_and_blanks(tmp_path: Path) -> None:
    # a finished run logs its whole-run tokens/s at the end; b stopped early: its last rolling one
    rows_a = [*audio_rows(6.0, 0.9, 8.0), {"summary/tokens_per_sec": 800.0, "step": 3}]
    a = make_run(tmp_path / "a", ["quantizer=rvq", "trainer.max_epochs=2"], rows_a)
    b = make_run(
        tmp_path / "b", ["quantizer=fsq", "trainer.max_epochs=2"], audio_rows(4.0, 0.5, 7.5)
    )
    rows_c = [{"val/si_snr": float("nan"), "val/codebook/utilization": 0.3}]
    c = make_run(tmp_path / "c", ["quantizer=lfq", "trainer.max_epochs=2"], rows_c)
    comparison = compare([Run.load(p) for p in (a, b, c)])
    assert comparison.stage == "val"  # no run has test metrics
    assert comparison.common_overrides == ["trainer.max_epochs=2"]
    assert "psnr" not in comparison.columns and "si_snr" in comparison.columns
    first, second, third = comparison.rows
    assert first["overrides"] == "quantizer=rvq"
    assert (first["si_snr"], first["utilization"], first["bitrate_kbps"]) == (6.0, 0.9, 8.0)
    assert first["tokens_per_sec"] == 800.0  # the whole-run average wins over the rolling one
    assert (second["si_snr"], second["tokens_per_sec"]) == (4.0, 900.0)
    assert third["si_snr"] is None  # NaN is shown blank, like a metric never logged
    assert third["bitrate_kbps"] is None and third["perplexity"] is None
    assert third["tokens_per_sec"] is None


def test_test_stage_only_when_every_run_has_it(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", ["x=1"], [{"val/psnr": 20.0, "test/psnr": 21.0}])
    b = make_run(tmp_path / "b", ["x=2"], [{"val/psnr": 22.0, "test/psnr": 23.0}])
    c = make_run(tmp_path / "c", ["x=3"], [{"val/psnr": 24.0}])
    assert [r["psnr"] for r in compare([Run.load(a), Run.load(b)]).rows] == [21.0, 23.0]
    both = compare([Run.load(p) for p in (a, b, c)])
    assert both.stage == "val" and [r["psnr"] for r in both.rows] == [20.0, 22.0, 24.0]


def test_plot_has_a_bitrate_panel_when_runs_log_bitrate(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", ["quantizer=rvq"], audio_rows(6.0, 0.9, 8.0))
    b = make_run(tmp_path / "b", ["quantizer=fsq"], audio_rows(4.0, 0.5, 7.5))
    figure = comparison_figure(compare([Run.load(a), Run.load(b)]))
    utilization, bitrate = figure.axes
    assert "utilization" in utilization.get_xlabel() and "SI-SNR" in utilization.get_ylabel()
    assert "bitrate" in bitrate.get_xlabel()
    points = [c.get_offsets()[0].tolist() for c in utilization.collections]
    np.testing.assert_allclose(points, [[90.0, 6.0], [50.0, 4.0]])  # utilization in percent
    points = [c.get_offsets()[0].tolist() for c in bitrate.collections]
    np.testing.assert_allclose(points, [[8.0, 6.0], [7.5, 4.0]])
    assert [t.get_text() for t in bitrate.texts] == ["quantizer=rvq", "quantizer=fsq"]


def test_image_runs_get_one_panel(tmp_path: Path) -> None:
    a = make_run(
        tmp_path / "a", ["quantizer=vq"], [{"val/psnr": 25.0, "val/codebook/utilization": 1.0}]
    )
    figure = comparison_figure(compare([Run.load(a)]))
    (panel,) = figure.axes
    assert "PSNR" in panel.get_ylabel()
    assert [t.get_text() for t in panel.texts] == ["quantizer=vq"]


def crashed_run(path: Path, overrides: list[str], error: str | None = None) -> Path:
    """What a run that crashed before its first validation leaves: train.log and .hydra (and,
    from train.py, failed.json with the error)."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (path / "train.log").write_text("[INFO] - instantiating callback model_checkpoint\n")
    if error is not None:
        (path / FAILED_MARKER).write_text(json.dumps({"error": error}) + "\n")
    return path


def test_a_crashed_run_is_left_out_and_the_others_stay_on_test(tmp_path: Path) -> None:
    a = make_run(tmp_path / "0", ["x=1"], [{"val/psnr": 20.0, "test/psnr": 21.0}])
    crashed = crashed_run(tmp_path / "1", ["x=2"])
    failed = crashed_run(tmp_path / "2", ["x=3"], error="ValueError: Invalid learning rate: -1")
    b = make_run(tmp_path / "3", ["x=4"], [{"val/psnr": 22.0, "test/psnr": 23.0}])
    assert find_run_dirs([tmp_path]) == [a, crashed, failed, b]
    comparison = compare([Run.load(p) for p in find_run_dirs([tmp_path])])
    assert comparison.stage == "test"
    assert [row["run"] for row in comparison.rows] == ["0", "3"]  # no blank rows
    assert [row["psnr"] for row in comparison.rows] == [21.0, 23.0]
    assert "status" not in comparison.columns  # every run shown finished
    (first, why_first), (second, why_second) = comparison.left_out
    assert (first, second) == (str(crashed), str(failed))
    assert why_first.startswith("no metrics logged")
    assert why_second == "failed: ValueError: Invalid learning rate: -1"


def test_a_run_that_failed_after_validating_is_marked_and_does_not_decide_the_stage(
    tmp_path: Path,
) -> None:
    a = make_run(tmp_path / "a", ["x=1"], [{"val/psnr": 20.0, "test/psnr": 21.0}])
    diverged = make_run(tmp_path / "b", ["x=2"], [{"val/psnr": 5.0}])
    (diverged / FAILED_MARKER).write_text(json.dumps({"error": "RuntimeError: loss is nan"}))
    comparison = compare([Run.load(a), Run.load(diverged)])
    assert comparison.stage == "test"
    assert comparison.columns[:3] == ["run", "status", "overrides"]
    ok, failed = comparison.rows
    assert (ok["status"], ok["psnr"]) == ("ok", 21.0)
    assert (failed["status"], failed["psnr"]) == ("failed", None)  # no test value: blank
    assert comparison.left_out == []


def test_compare_script_marks_failures_and_refuses_when_nothing_finished(tmp_path: Path) -> None:
    a = make_run(tmp_path / "runs" / "a", ["x=1"], [{"val/psnr": 20.0, "test/psnr": 21.0}])
    crashed = crashed_run(tmp_path / "runs" / "b", ["x=2"], error="KeyboardInterrupt")
    out = tmp_path / "out"
    result = run_script("scripts/compare.py", str(tmp_path / "runs"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"left out {crashed}: failed: KeyboardInterrupt" in result.stdout
    assert "test metrics" in result.stdout
    markdown = (out / "comparison.md").read_text()
    assert f"- `{crashed}`: failed: KeyboardInterrupt" in markdown
    with (out / "comparison.csv").open(newline="") as f:
        assert [row["run"] for row in csv.DictReader(f)] == [a.name]

    result = run_script("scripts/compare.py", str(crashed), "--out", str(tmp_path / "none"))
    assert result.returncode == 1
    assert "no run to compare" in result.stderr and "KeyboardInterrupt" in result.stderr
    assert not (tmp_path / "none").exists()


def test_columns_follow_what_the_runs_logged(tmp_path: Path) -> None:
    """A model kind the table knows nothing of: its shared metrics become columns (losses and
    metrics only some runs have left out); a name a known column has keeps the stage prefix."""
    prior = {
        "val/nll": 2.0,
        "val/bits_per_token": 2.9,
        "val/perplexity": 7.4,
        "val/loss": 2.1,
        "sample/fd": 30.0,
        "summary/tokens_per_sec": 1000.0,
    }
    a = make_run(tmp_path / "a", ["p=1"], [prior])
    b = make_run(tmp_path / "b", ["p=2"], [{**prior, "val/nll": 1.5, "val/extra": 1.0}])
    comparison = compare([Run.load(a), Run.load(b)])
    assert comparison.columns == [
        "run",
        "overrides",
        "bits_per_token",
        "nll",
        "perplexity",
        "fd",
        "tokens_per_sec",
    ]
    assert [row["nll"] for row in comparison.rows] == [2.0, 1.5]
    # beside a tokenizer run, the codebook perplexity column keeps its name
    tokenizer = {"val/psnr": 20.0, "val/codebook/perplexity": 9.0, "val/recon_loss": 0.1}
    tokenizer |= {"val/mel_distance": 1.0, "val/nonfinite_tokens": 0.0}  # not compared
    tok = make_run(tmp_path / "c", ["p=3"], [{**prior, **tokenizer}])
    alone = compare([Run.load(tok)])
    assert alone.columns[2:] == [
        "psnr",
        "bits_per_token",
        "nll",
        "val/perplexity",
        "fd",
        "utilization",
        "perplexity",
        "dead_codes",
        "bitrate_kbps",
        "tokens_per_sec",
    ]
    mixed = compare([Run.load(a), Run.load(tok)])
    assert "val/perplexity" in mixed.columns and "perplexity" in mixed.columns
    assert [row["perplexity"] for row in mixed.rows] == [None, 9.0]
    assert [row["val/perplexity"] for row in mixed.rows] == [7.4, 7.4]


def test_train_records_its_failure_for_compare(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "crashed"
    result = run_script("train.py", "quantizer.name=not_a_quantizer", f"hydra.run.dir={run_dir}")
    assert result.returncode != 0
    record = json.loads((run_dir / FAILED_MARKER).read_text())
    assert record["error"].startswith("UnknownQuantizerError:")
    assert not list(run_dir.glob("csv/version_*/metrics.csv"))
    good = make_run(tmp_path / "runs" / "good", [], [{"val/psnr": 20.0, "test/psnr": 21.0}])
    comparison = compare([Run.load(p) for p in find_run_dirs([tmp_path / "runs"])])
    assert comparison.stage == "test" and [row["run"] for row in comparison.rows] == [good.name]
    assert comparison.left_out == [(str(run_dir), f"failed: {record['error']}")]


def test_failure_marker_is_cleared_on_a_new_attempt_and_skips_preemption(tmp_path: Path) -> None:
    class PreemptedError(Exception):
        pass

    with pytest.raises(RuntimeError), record_failure(tmp_path):
        raise RuntimeError("boom")
    assert read_failure(tmp_path) == {"error": "RuntimeError: boom", "pid": os.getpid()}
    with record_failure(tmp_path):  # the run starts again and finishes
        pass
    assert read_failure(tmp_path) is None
    with pytest.raises(PreemptedError), record_failure(tmp_path, not_failures=(PreemptedError,)):
        raise PreemptedError
    assert read_failure(tmp_path) is None
    with pytest.raises(RuntimeError), record_failure(tmp_path, write=False):  # rank 1..
        raise RuntimeError("boom")
    assert read_failure(tmp_path) is None
