"""train.py and eval.py end to end, on the embedded MNIST digits, on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from eval import evaluate
from src.callbacks.config_in_checkpoint import CONFIG_KEY
from src.models.quantizer_adapter import bottleneck_quantizers
from src.quantizers import UnknownQuantizerError, registered_quantizers
from tests.conftest import compose_config
from tests.helpers import QUICK, last_logged, read_metrics_csv, run_script
from train import train

VAL_METRICS = [
    "val/psnr",
    "val/loss",
    "val/recon_loss",
    "val/codebook/utilization",
    "val/codebook/perplexity",
    "val/codebook/dead_codes",
]


@pytest.mark.parametrize("name", bottleneck_quantizers())
def test_every_registered_quantizer_trains_with_fast_dev_run(name: str, train_config) -> None:
    cfg = train_config(f"quantizer={name}", "debug=fdr", "extras.print_config=false")
    metrics = train(cfg)
    assert math.isfinite(metrics["test/psnr"])
    assert 0.0 < metrics["test/codebook/utilization"] <= 1.0


def test_index_only_quantizer_is_a_clear_error(tmp_path: Path) -> None:
    assert "rpq" in registered_quantizers() and "rpq" not in bottleneck_quantizers()
    result = run_script("train.py", "quantizer=rpq", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "rpq produces only indices" in result.stderr
    assert "cannot sit between encoder and decoder" in result.stderr
    assert "rvq" in result.stderr.split("pick one of:")[-1]
    assert not (tmp_path / "checkpoints").exists()


def test_train_writes_checkpoints_metrics_and_grids(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_script("train.py", *QUICK, "quantizer=vq", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    pngs = list((run_dir / "reconstructions").glob("*.png"))
    assert len(pngs) == 1
    rows = read_metrics_csv(run_dir)
    for name in [*VAL_METRICS, "test/psnr", "test/codebook/utilization"]:
        assert math.isfinite(last_logged(rows, name))
    # the closing summary names the checkpoint, the metrics file and the images
    assert "last checkpoint" in result.stdout and "metrics csv" in result.stdout
    assert "reconstructions" in result.stdout


def test_eval_reproduces_logged_validation_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_config(
        "train", [*QUICK, "trainer.max_epochs=2", "test=false"], output_dir=run_dir
    )
    train(cfg)
    logged = read_metrics_csv(run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint[CONFIG_KEY]["model"]["quantizer"]["name"] == "fsq"

    eval_cfg = compose_config(
        "eval", [f"ckpt_path={ckpt}", "test=false", "logger=csv"], output_dir=tmp_path / "eval"
    )
    reproduced = evaluate(eval_cfg)
    for name in VAL_METRICS:
        assert reproduced[name] == pytest.approx(last_logged(logged, name), abs=1e-4, rel=1e-6)


def test_same_seed_same_run(tmp_path: Path) -> None:
    results = []
    for i in range(2):
        cfg = compose_config("train", [*QUICK, "test=false"], output_dir=tmp_path / str(i))
        results.append(train(cfg))
    assert results[0]["val/psnr"] == results[1]["val/psnr"]
    assert results[0]["val/codebook/perplexity"] == results[1]["val/codebook/perplexity"]


def test_unknown_quantizer_option_lists_configs(tmp_path: Path) -> None:
    result = run_script("train.py", "quantizer=nope", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "Could not find 'quantizer/nope'" in result.stderr
    assert "fsq" in result.stderr and "vq" in result.stderr


def test_unknown_quantizer_name_fails_before_training(train_config, tmp_path: Path) -> None:
    cfg = train_config("quantizer.name=nope", *QUICK)
    with pytest.raises(UnknownQuantizerError) as error:
        train(cfg)
    message = str(error.value)
    assert "'nope'" in message
    for name in registered_quantizers():
        assert name in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    cfg = compose_config("eval", [f"ckpt_path={tmp_path}/none.ckpt"], output_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        evaluate(cfg)


def test_multirun_runs_one_job_per_quantizer(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_script(
        "train.py",
        "-m",
        "quantizer=vq,fsq",
        *QUICK,
        "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in job_dirs] == ["0", "1"]
    for job_dir in job_dirs:
        assert (job_dir / "checkpoints" / "last.ckpt").is_file()
        assert math.isfinite(last_logged(read_metrics_csv(job_dir), "test/psnr"))
