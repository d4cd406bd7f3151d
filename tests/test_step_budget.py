"""Training to a step budget with validation every N steps across epochs, a final test, and the
periodic checkpoints that keep the newest K beside the best (README "Long runs"), on
tests/short_run.py's run: 5 steps, 3 batches per epoch, validation every 2 steps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import read_metrics_csv
from tests.short_run import K


def global_step(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["global_step"])


def test_trains_to_the_step_budget_validating_every_two_steps(short_run) -> None:
    metrics, run_dir = short_run
    checkpoints = run_dir / "checkpoints"
    assert global_step(checkpoints / "last.ckpt") == 5
    assert json.loads((checkpoints / "final.json").read_text())["global_step"] == 5
    # the code-frequency charts are named by the global step each validation ran at
    charts = sorted(p.name for p in (run_dir / "code_frequencies").glob("val_*.png"))
    assert charts == ["val_epoch=000-step=000002.png", "val_epoch=001-step=000004.png"]
    rows = read_metrics_csv(run_dir)
    val = [(int(r["epoch"]), int(r["step"])) for r in rows if r.get("val/psnr")]
    # Lightning logs a validation after global step s at step s - 1, as the batch that made s
    assert val == [(0, 1), (1, 3)]
    assert max(int(r["step"]) for r in rows if r.get("train/loss_step")) == 4  # 5 batches
    # the final evaluation: the best checkpoint tested once training stopped
    (test,) = [r for r in rows if r.get("test/psnr")]
    assert float(test["test/psnr"]) == pytest.approx(metrics["test/psnr"], rel=1e-6)
    assert list((run_dir / "code_frequencies").glob("test_step=*.png"))


def test_periodic_checkpoints_keep_the_newest_k_and_the_best_survives(short_run) -> None:
    _, run_dir = short_run
    checkpoints = run_dir / "checkpoints"
    periodic = sorted(checkpoints.glob("step_*.ckpt"))
    assert len(periodic) == K
    assert [p.name for p in periodic] == ["step_0000004.ckpt", "step_0000005.ckpt"]
    assert [global_step(p) for p in periodic] == [4, 5]  # steps 1-3 were written, then pruned
    assert global_step(checkpoints / "last.ckpt") == 5
    # the best by val/psnr is kept by its own callback, whatever the periodic ones prune
    rows = read_metrics_csv(run_dir)
    psnr = {int(r["step"]) + 1: float(r["val/psnr"]) for r in rows if r.get("val/psnr")}
    best_step = max(psnr, key=psnr.get)
    (best,) = checkpoints.glob("epoch_*.ckpt")
    assert global_step(best) == best_step
    epoch = int(re.fullmatch(r"epoch_(\d+)\.ckpt", best.name)[1])
    assert epoch == (best_step - 1) // 3  # named after the epoch of that validation
    state = torch.load(best, weights_only=True)["callbacks"]
    (score,) = [s["best_model_score"] for k, s in state.items() if k.startswith("ModelCheckpoint")]
    assert float(score) == pytest.approx(max(psnr.values()), rel=1e-6)
