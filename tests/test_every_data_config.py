"""Every data config trains through train.py with its model and every logger (logger=many).

Datamodules are tested alone in tests/data; this checks the pairs: a datamodule and a model
must go through Lightning's fit/test together (e.g. their hyperparameters must not clash when
the loggers record them). Data that would be downloaded or installed is replaced by a tiny
on-disk copy in the reader's own layout (tests/fake_datasets.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torchvision.datasets.cifar
import wandb

from tests.conftest import ROOT, compose_config
from tests.fake_datasets import (
    AUDIO_ASSETS,
    audio_copy,
    fake_cifar10,
    fake_librispeech,
    fake_mnist,
    fake_yesno,
    png_folder,
)
from tests.helpers import read_metrics_csv
from train import train

IMAGE = ["data.batch_size=4"]
# the audio experiments' model, callbacks and monitored metric, on short clips
AUDIO = ["experiment=audio_speech", "data.batch_size=2", "trainer.max_time=null"]

# data config -> (overrides given the fixture folder, builder of that folder or None)
CASES: dict[str, tuple[Callable[[Path], list[str]], Callable[[Path], Path] | None]] = {
    "mnist_embedded": (lambda root: IMAGE, None),
    "photos_embedded": (lambda root: [*IMAGE, "data.patches_per_image=4"], None),
    "mnist": (lambda root: [*IMAGE, f"data.root={root}", "data.val_fraction=0.2"], fake_mnist),
    "cifar10": (lambda root: [*IMAGE, f"data.root={root}"], fake_cifar10),
    "image_folder": (
        lambda root: [*IMAGE, f"data.root={root}", "data.image_size=16", "data.num_workers=0"],
        png_folder,
    ),
    "allison_speech": (lambda root: [*AUDIO, f"data.root={root}"], audio_copy),
    "audio_folder": (lambda root: [*AUDIO, f"data.root={AUDIO_ASSETS}"], None),
    "librispeech": (
        lambda root: [*AUDIO, f"data.root={root}", "data.num_workers=0"],
        fake_librispeech,
    ),
    "yesno": (lambda root: [*AUDIO, f"data.root={root}", "data.num_workers=0"], fake_yesno),
}

# data configs trained end to end elsewhere, with the model they pair with
COVERED_ELSEWHERE = {
    # stage 2: codes of a trained tokenizer, only with model=prior (needs a tokenizer checkpoint;
    # trained there with the default CSV logger, not logger=many)
    "tokenizer_codes": "tests/test_prior_train.py",
}

RUN = [
    "logger=many",
    "trainer.max_epochs=1",
    "trainer.max_steps=2",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "callbacks.model_summary=null",
    "extras.print_config=false",
]


def test_every_data_config_has_a_case() -> None:
    configs = sorted(p.stem for p in (ROOT / "configs" / "data").glob("*.yaml"))
    assert sorted([*CASES, *COVERED_ELSEWHERE]) == configs
    for test_file in COVERED_ELSEWHERE.values():
        assert (ROOT / test_file).is_file(), test_file


@pytest.mark.parametrize("data", sorted(CASES))
def test_data_config_trains_and_tests_with_every_logger(
    data: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides, build = CASES[data]
    root = build(tmp_path / "data") if build else tmp_path / "data"
    if data == "cifar10":  # the tiny batches cannot match the real archive's MD5 sums
        monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: True)
    run_dir = tmp_path / "run"
    cfg = compose_config("train", [f"data={data}", *overrides(root), *RUN], output_dir=run_dir)
    try:
        metrics = train(cfg)
    finally:
        wandb.finish()  # in-process: no Hydra job end finishes the W&B run
    audio = data in {"allison_speech", "audio_folder", "librispeech", "yesno"}
    quality = "test/si_snr" if audio else "test/psnr"
    assert math.isfinite(metrics[quality])
    losses = [float(r["train/loss"]) for r in read_metrics_csv(run_dir) if r.get("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    assert list((run_dir / "tensorboard" / "version_0").glob("events.out.tfevents.*"))
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
