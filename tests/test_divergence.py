"""A diverged run stops with a clear error, exits non-zero, writes no final.json, and leaves only
finite checkpoints (issue 16 fault 2); non-finite latent tokens are counted in a logged metric."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch

from src.callbacks.divergence import DivergenceError, DivergenceStop
from src.models.image_tokenizer import ImageTokenizer
from tests.helpers import read_metrics_csv, run_script

# a checkpoint after every step; validation only at the end of the 4-batch epoch
TINY = [
    "extras.print_config=false",
    "callbacks.model_summary=null",
    "callbacks.reconstruction_grid=null",
    "trainer.max_steps=4",
    "+trainer.limit_train_batches=4",
    "+trainer.limit_val_batches=1",
    "callbacks.periodic_checkpoint.every_n_train_steps=1",
    "callbacks.periodic_checkpoint.save_top_k=-1",
]


def _finite(checkpoint: Path) -> bool:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_huge_learning_rate_stops_with_the_step_and_what_to_try(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = ["quantizer=vq", "model.lr=1e8", "model.warmup_steps=0", *TINY]
    result = run_script("train.py", *overrides, f"hydra.run.dir={run_dir}")
    assert result.returncode != 0
    assert "DivergenceError: training diverged: the gradients of step 2 are not finite" in (
        result.stderr
    )
    for hint in ("model.lr, now 100000000.0", "trainer.gradient_clip_val, now 1.0"):
        assert hint in result.stderr, hint
    ckpt_dir = run_dir / "checkpoints"
    assert not (ckpt_dir / "final.json").exists()
    # step 1 (its loss and gradients finite) is kept, step 2 (NaN gradients) never stepped
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["last.ckpt", "step_0000001.ckpt"]
    assert all(_finite(p) for p in ckpt_dir.glob("*.ckpt"))
    assert "DivergenceError" in (run_dir / "failed.json").read_text()


def test_nan_monitored_metric_stops_before_any_checkpoint_ranks_it() -> None:
    checkpoint = SimpleNamespace(monitor="val/psnr", dirpath="/runs/x/checkpoints")
    trainer = SimpleNamespace(
        sanity_checking=False,
        checkpoint_callbacks=[checkpoint],
        checkpoint_callback=checkpoint,
        callback_metrics={"val/psnr": torch.tensor(float("nan"))},
        global_step=7,
        current_epoch=1,
        gradient_clip_val=None,
        precision="bf16-mixed",
    )
    module = SimpleNamespace(hparams=SimpleNamespace(lr=0.5))
    with pytest.raises(DivergenceError, match=r"val/psnr is nan after step 7") as info:
        DivergenceStop().on_validation_end(trainer, module)
    message = str(info.value)
    assert "model.lr, now 0.5" in message and "trainer.gradient_clip_val=1.0" in message
    assert "trainer.precision=32-true, now bf16-mixed" in message
    trainer.callback_metrics["val/psnr"] = torch.tensor(float("inf"))  # a perfect reconstruction
    DivergenceStop().on_validation_end(trainer, module)


def test_patience_counts_non_finite_steps_in_a_row() -> None:
    checkpoint = SimpleNamespace(dirpath=None)
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(reduce_boolean_decision=lambda value, all: value),
        global_step=3,
        current_epoch=0,
        gradient_clip_val=1.0,
        precision="16-mixed",
        checkpoint_callback=checkpoint,
    )
    module = SimpleNamespace(hparams=SimpleNamespace(lr=1e-3))
    stop = DivergenceStop(patience=2)
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    for loss in (nan, one, nan):  # never two in a row
        stop.on_train_batch_end(trainer, module, {"loss": loss}, None, 0)
    with pytest.raises(DivergenceError, match="non-finite for 2 steps in a row"):
        stop.on_train_batch_end(trainer, module, {"loss": torch.tensor(float("inf"))}, None, 0)


def test_nonfinite_tokens_are_counted_per_epoch(train_config) -> None:
    """A NaN image patch reaches the quantizer as non-finite tokens: counted, finite others."""
    cfg = train_config("quantizer=vq", "extras.print_config=false")
    model = hydra.utils.instantiate(cfg.model, in_channels=1, _convert_="all")
    assert isinstance(model, ImageTokenizer)
    images = torch.rand(2, 1, 28, 28)
    images[0, 0, :4, :4] = float("nan")  # one 4x4 patch: the token above it and its neighbours
    model.shared_step(images, "val")
    count = model.metrics_for("val")["nonfinite_tokens"].compute()
    clean = model.metrics_for("val")["codebook"]
    assert 1 <= count <= 49  # only image 0's tokens near the patch (receptive field)
    # the usage metric saw -1 for those tokens and valid codes for the rest
    assert int(clean.counts.sum()) == 2 * 49 - int(count)


def test_nonfinite_tokens_metric_is_logged(short_run: tuple[dict[str, float], Path]) -> None:
    _, run_dir = short_run
    rows = read_metrics_csv(run_dir)
    logged = [float(r["val/nonfinite_tokens"]) for r in rows if r.get("val/nonfinite_tokens")]
    assert logged and all(v == 0 for v in logged)
