"""Per-codebook usage metrics (`<stage>/codebook/<i>/...`) and code histograms
(`<stage>/codebook/<i>/frequencies`) of a real multi-codebook run (tests/short_run.py: residual
VQ, 4 codebooks, every logger) reach the CSV, TensorBoard and the offline W&B run alike."""

from __future__ import annotations

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import last_logged, read_metrics_csv
from tests.short_run import CODEBOOKS, CODES
from tests.wandb_offline import offline_runs, summarize

NAMES = ("utilization", "perplexity", "dead_codes")
VALIDATIONS = {"val": 2, "test": 1}  # epochs of each stage in the run


def logged_values(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(row[name]) for row in rows if row.get(name)]


@pytest.mark.parametrize("stage", ["val", "test"])
def test_per_codebook_metrics_in_the_csv(short_run, stage: str) -> None:
    rows = read_metrics_csv(short_run[1])
    assert f"{stage}/codebook/{CODEBOOKS}/utilization" not in rows[0]  # 0..3, no more
    for name in NAMES:
        per_codebook = [
            logged_values(rows, f"{stage}/codebook/{i}/{name}") for i in range(CODEBOOKS)
        ]
        overall = logged_values(rows, f"{stage}/codebook/{name}")
        assert len(overall) == VALIDATIONS[stage]
        np.testing.assert_allclose(overall, np.mean(per_codebook, axis=0), rtol=1e-5)
    for i in range(CODEBOOKS):
        used = last_logged(rows, f"{stage}/codebook/{i}/utilization")
        dead = last_logged(rows, f"{stage}/codebook/{i}/dead_codes")
        assert 0 < used <= 1 and dead == pytest.approx(CODES * (1 - used))


@pytest.mark.parametrize("stage", ["val", "test"])
def test_per_codebook_metrics_and_histograms_in_wandb(short_run, stage: str) -> None:
    run_dir = short_run[1]
    rows = read_metrics_csv(run_dir)
    (folder,) = offline_runs(run_dir)
    history = summarize(folder)["history"]
    for i in range(CODEBOOKS):
        for name in NAMES:
            key = f"{stage}/codebook/{i}/{name}"
            values = [row[key] for row in history if key in row]
            assert values == pytest.approx(logged_values(rows, key), rel=1e-6), key
        key = f"{stage}/codebook/{i}/frequencies/values"  # one bin per code
        histograms = [np.asarray(row[key]) for row in history if key in row]
        assert len(histograms) == VALIDATIONS[stage]
        bins = histograms[-1]
        assert len(bins) == CODES and bins.sum() == pytest.approx(1.0, rel=1e-6)
        used = last_logged(rows, f"{stage}/codebook/{i}/utilization")
        assert (bins > 0).mean() == pytest.approx(used, abs=1e-9)
    assert not any(f"{stage}/codebook/frequencies/values" in row for row in history)


def test_per_codebook_histograms_in_tensorboard(short_run) -> None:
    run_dir = short_run[1]
    rows = read_metrics_csv(run_dir)
    (version,) = (run_dir / "tensorboard").iterdir()
    events = EventAccumulator(str(version), size_guidance={"histograms": 0})
    events.Reload()
    for stage, count in VALIDATIONS.items():
        for i in range(CODEBOOKS):
            histograms = events.Histograms(f"{stage}/codebook/{i}/frequencies")
            assert len(histograms) == count
            used = np.asarray(histograms[-1].histogram_value.bucket) > 0
            expected = last_logged(rows, f"{stage}/codebook/{i}/utilization")
            assert used.mean() == pytest.approx(expected, abs=1e-9)
