"""src/utils/run_table.py and compare_plot.py on hand-written run directories: which runs are
found, which values and stage are compared, what the plot draws."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from src.utils.compare_plot import comparison_figure
from src.utils.run_table import Run, compare, find_run_dirs


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
