"""A real 2-job multirun (`experiment=glob(mnist_*,exclude=[...])`: mnist_fsq and mnist_vq, every
logger on; the FSQ-1000 variant and the stage-2 experiments left out) and what comes out of it:
scripts/compare.py's table and plot, the offline W&B runs, and the media of every logger."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
import wandb
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scripts import compare
from tests.helpers import QUICK, last_logged, read_metrics_csv, run_script
from tests.wandb_offline import offline_runs, summarize

EXPERIMENTS = {"0": ("mnist_fsq", "fsq"), "1": ("mnist_vq", "vq")}
CODEBOOK = ("utilization", "perplexity", "dead_codes")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # as when train.py is started by a process that uses W&B (or after in-process W&B tests):
    # the child inherits WANDB_SERVICE and attaches to this process's W&B service, so its runs
    # end only if the jobs finish them (Hydra callback FinishWandbRun)
    wandb.setup()
    assert "WANDB_SERVICE" in os.environ
    sweep_dir = tmp_path_factory.mktemp("multirun") / "demo_sweep"
    result = run_script(
        "train.py",
        "-m",
        "experiment=glob(mnist_*,exclude=[mnist_fsq_*,mnist_prior,mnist_two_stage])",
        "logger=many",
        *QUICK,
        "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_glob_multirun_runs_each_matching_experiment(sweep: Path) -> None:
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job, (experiment, quantizer) in EXPERIMENTS.items():
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        assert f"experiment={experiment}" in overrides
        config = yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())
        assert config["quantizer"]["name"] == quantizer


def test_compare_turns_the_multirun_into_a_table_and_a_plot(sweep: Path) -> None:
    result = run_script("scripts/compare.py", str(sweep))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "experiment=mnist_fsq" in result.stdout and "experiment=mnist_vq" in result.stdout

    rows = read_csv(sweep / "comparison.csv")
    assert [row["run"] for row in rows] == ["0", "1"]
    for row in rows:
        logged = read_metrics_csv(sweep / row["run"])
        experiment = EXPERIMENTS[row["run"]][0]
        assert row["overrides"] == f"experiment={experiment}"  # the shared ones are left out
        assert float(row["psnr"]) == last_logged(logged, "test/psnr")
        assert float(row["ssim"]) == last_logged(logged, "test/ssim")  # image tokenizers log it
        assert 0 < float(row["ssim"]) <= 1
        for name in CODEBOOK:
            assert float(row[name]) == last_logged(logged, f"test/codebook/{name}")
        assert row["bitrate_kbps"] == ""  # image tokenizers log no bitrate: blank, not 0
        # 3 batches never fill the rolling window: the whole-run average logged at the end
        assert not any(r.get("train/tokens_per_sec") for r in logged)
        tokens_per_sec = last_logged(logged, "summary/tokens_per_sec")
        assert float(row["tokens_per_sec"]) == tokens_per_sec > 0
    assert "si_snr" not in rows[0]  # no run has it

    markdown = (sweep / "comparison.md").read_text().splitlines()
    table = [line for line in markdown if line.startswith("| ")]
    assert len(table) == 2 + len(rows)  # header, rule, one line per run
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header.index("ssim") == header.index("psnr") + 1  # quality side by side
    with Image.open(sweep / "comparison.png") as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 300
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10  # something is drawn


def test_compare_chosen_runs_into_another_folder_on_validation(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = [str(sweep / "1"), str(sweep / "0"), "--out", str(out), "--stage", "val"]
    assert compare.main(args) == 0
    rows = read_csv(out / "comparison.csv")
    assert [row["run"] for row in rows] == ["1", "0"]  # in the order given
    for row in rows:
        logged = read_metrics_csv(sweep / row["run"])
        assert float(row["psnr"]) == last_logged(logged, "val/psnr")
        assert float(row["utilization"]) == last_logged(logged, "val/codebook/utilization")
    assert (out / "comparison.png").is_file() and (out / "comparison.md").is_file()


def test_compare_refuses_a_folder_without_runs(tmp_path: Path) -> None:
    result = run_script("scripts/compare.py", str(tmp_path))
    assert result.returncode == 2
    assert "no run directories under" in result.stderr
    assert not (tmp_path / "comparison.csv").exists()


def test_each_job_has_an_offline_wandb_run_with_its_codebook_metrics(sweep: Path) -> None:
    ids = set()
    for job, (experiment, quantizer) in EXPERIMENTS.items():
        (folder,) = offline_runs(sweep / job)
        run = summarize(folder)
        ids.add(run["id"])
        assert run["group"] == "demo_sweep"  # the sweep's jobs sit together
        assert run["name"] == f"experiment={experiment}"
        assert run["config"]["model"]["quantizer"]["name"] == quantizer  # the resolved config
        logged = read_metrics_csv(sweep / job)
        for stage in ("val", "test"):
            for name in CODEBOOK:
                key = f"{stage}/codebook/{name}"
                values = [row[key] for row in run["history"] if key in row]
                assert values, f"{key} missing from the W&B run"
                assert values[-1] == pytest.approx(last_logged(logged, key), rel=1e-6)
        key = "summary/tokens_per_sec"
        (value,) = [row[key] for row in run["history"] if key in row]
        assert value == pytest.approx(last_logged(logged, key), rel=1e-6)
    assert len(ids) == 2


def test_media_reach_files_tensorboard_and_wandb(sweep: Path) -> None:
    for job in EXPERIMENTS:
        run_dir = sweep / job
        logged = read_metrics_csv(run_dir)
        # files in the run directory (what the CSV logger gets)
        assert len(list((run_dir / "reconstructions").glob("*.png"))) == 1
        assert len(list((run_dir / "code_frequencies").glob("val_epoch=*.png"))) == 1
        assert len(list((run_dir / "code_frequencies").glob("test_step=*.png"))) == 1
        # TensorBoard
        (events_dir,) = (run_dir / "tensorboard").glob("version_*")
        events = EventAccumulator(str(events_dir), size_guidance={"images": 0, "histograms": 0})
        events.Reload()
        tags = events.Tags()
        for tag in ("val/reconstructions", "val/codebook/frequencies_chart"):
            assert tag in tags["images"]
        for stage in ("val", "test"):
            (histogram,) = events.Histograms(f"{stage}/codebook/frequencies")
            used = np.asarray(histogram.histogram_value.bucket) > 0
            assert used.mean() == pytest.approx(
                last_logged(logged, f"{stage}/codebook/utilization"), abs=1e-6
            )
        # W&B: media files and the same code histogram
        (folder,) = offline_runs(run_dir)
        media = folder / "files" / "media" / "images"
        assert list(media.glob("val/reconstructions_*.png"))
        assert list(media.glob("val/codebook/frequencies_chart_*.png"))
        history = summarize(folder)["history"]
        (row,) = [r for r in history if "val/codebook/frequencies/values" in r]
        values = np.asarray(row["val/codebook/frequencies/values"])
        assert math.isclose(values.sum(), 1.0, rel_tol=1e-6)
        assert (values > 0).mean() == pytest.approx(
            last_logged(logged, "val/codebook/utilization"), abs=1e-6
        )
