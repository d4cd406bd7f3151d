"""src/loggers/media.py: the same image, clip and histogram reach TensorBoard and W&B, read back
from what each wrote to disk."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import wandb
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.loggers import WandbRunLogger, log_audio, log_histogram, log_image
from src.loggers.media import WANDB_MAX_BINS, image_to_hwc_uint8
from tests.wandb_offline import offline_runs, summarize


@pytest.fixture
def loggers(tmp_path: Path) -> Iterator[tuple[TensorBoardLogger, WandbRunLogger, CSVLogger]]:
    tensorboard = TensorBoardLogger(tmp_path / "tb", name=None)
    run = WandbRunLogger(save_dir=str(tmp_path), mode="offline", name="media")
    yield tensorboard, run, CSVLogger(tmp_path, name="csv")
    wandb.finish()


def tensorboard_events(logger: TensorBoardLogger) -> EventAccumulator:
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "audio": 0})
    events.Reload()
    return events


def test_image_to_hwc_uint8_rounds_and_clamps() -> None:
    image = torch.tensor([[[0.0, 0.5, 1.2], [-0.1, 1 / 255, 0.999]]])  # (1, 2, 3)
    array = image_to_hwc_uint8(image)
    assert array.dtype == np.uint8 and array.shape == (2, 3, 1)
    assert array[..., 0].tolist() == [[0, 128, 255], [0, 1, 255]]
    with pytest.raises(ValueError, match=r"expected one \(C, H, W\) float image"):
        image_to_hwc_uint8(torch.zeros(2, 3, 8, 8))


def test_image_reaches_tensorboard_and_wandb_unchanged(loggers, tmp_path: Path) -> None:
    tensorboard, run, csv_logger = loggers
    image = torch.rand(3, 6, 10, generator=torch.Generator().manual_seed(0))
    expected = image_to_hwc_uint8(image)
    log_image([tensorboard, run, csv_logger], "val/reconstructions", image, step=7)

    (event,) = tensorboard_events(tensorboard).Images("val/reconstructions")
    assert event.step == 7
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
    np.testing.assert_array_equal(decoded, expected)

    wandb.finish()
    (folder,) = offline_runs(tmp_path)
    (row,) = [r for r in summarize(folder)["history"] if "val/reconstructions/_type" in r]
    assert row["trainer/global_step"] == 7
    (filename,) = row["val/reconstructions/filenames"]
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "files" / filename)), expected)


def test_audio_reaches_tensorboard_and_wandb(loggers, tmp_path: Path) -> None:
    tensorboard, run, _ = loggers
    rate = 8000
    samples = 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate // 4) / rate).astype(np.float32)
    log_audio([tensorboard, run], "val/audio/clip_00_recon", samples, rate, step=3)

    (event,) = tensorboard_events(tensorboard).Audio("val/audio/clip_00_recon")
    assert (event.step, event.sample_rate) == (3, rate)
    decoded, decoded_rate = sf.read(io.BytesIO(event.encoded_audio_string), dtype="float32")
    assert decoded_rate == rate
    np.testing.assert_allclose(decoded, samples, atol=1.5 / 32767)  # 16-bit PCM

    wandb.finish()
    (folder,) = offline_runs(tmp_path)
    (row,) = [r for r in summarize(folder)["history"] if "val/audio/clip_00_recon/_type" in r]
    (path,) = row["val/audio/clip_00_recon/audio"]
    written, written_rate = sf.read(folder / "files" / path["path"], dtype="float32")
    assert written_rate == rate and len(written) == len(samples)
    np.testing.assert_allclose(written, samples, atol=1.5 / 32767)


@pytest.mark.parametrize("size", [240, 1000])
def test_code_histogram_reaches_tensorboard_and_wandb(loggers, tmp_path: Path, size: int) -> None:
    tensorboard, run, _ = loggers
    weights = np.random.default_rng(size).random(size)
    weights[::7] = 0.0
    weights /= weights.sum()
    log_histogram([tensorboard, run], "val/codebook/frequencies", weights, step=5)

    (event,) = tensorboard_events(tensorboard).Histograms("val/codebook/frequencies")
    histogram = event.histogram_value
    np.testing.assert_allclose(histogram.bucket, weights)  # one bucket per code, in order
    np.testing.assert_allclose(histogram.bucket_limit, np.arange(size) + 0.5)
    assert histogram.num == pytest.approx(1.0)

    wandb.finish()
    (folder,) = offline_runs(tmp_path)
    (row,) = [r for r in summarize(folder)["history"] if "val/codebook/frequencies/_type" in r]
    values = np.asarray(row["val/codebook/frequencies/values"])
    bins = np.asarray(row["val/codebook/frequencies/bins"])
    assert len(values) <= WANDB_MAX_BINS and len(bins) == len(values) + 1
    # each W&B bin [edge_i, edge_i+1) sums the codes it covers
    expected = [weights[int(lo) : int(hi)].sum() for lo, hi in itertools.pairwise(bins)]
    np.testing.assert_allclose(values, expected)
    assert bins[0] == 0 and bins[-1] == size
