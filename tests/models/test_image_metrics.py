"""Image quality metrics of the image tokenizer: `<stage>/psnr` is the mean of per-image PSNRs
(what papers report), not the PSNR of the epoch's pooled error; `val/ssim` and `test/ssim` are
the mean per-image SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from src.models.image_tokenizer import ImageTokenizer, per_image_psnr, per_image_ssim

SIZES = (3, 1, 5, 2)  # batches of different sizes in one epoch


def batches(seed: int = 0, channels: int = 1, side: int = 16) -> list[tuple[torch.Tensor, ...]]:
    """(prediction, target) pairs in [0, 1] whose per-image errors differ by orders of
    magnitude, so the per-image mean and the pooled PSNR are far apart."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for size in SIZES:
        target = torch.rand(size, channels, side, side, generator=generator)
        scale = 10.0 ** -torch.randint(0, 4, (size, 1, 1, 1), generator=generator).float()
        noise = torch.randn(target.shape, generator=generator) * scale
        pairs.append(((target + noise).clamp(0, 1), target))
    return pairs


def numpy_per_image_mean_psnr(pairs: list[tuple[torch.Tensor, ...]]) -> float:
    values = []
    for prediction, target in pairs:
        for p, t in zip(prediction.double().numpy(), target.double().numpy(), strict=True):
            values.append(10 * math.log10(1.0 / np.mean((p - t) ** 2)))
    return float(np.mean(values))


def numpy_pooled_psnr(pairs: list[tuple[torch.Tensor, ...]]) -> float:
    errors = np.concatenate([(p - t).double().numpy().ravel() ** 2 for p, t in pairs])
    return 10 * math.log10(1.0 / errors.mean())


def test_psnr_is_the_mean_of_per_image_psnrs_over_batches() -> None:
    pairs = batches()
    metric = per_image_psnr()
    for prediction, target in pairs:
        metric.update(prediction, target)
    expected = numpy_per_image_mean_psnr(pairs)
    assert metric.compute().item() == pytest.approx(expected, abs=1e-3)
    # the pooled definition (torchmetrics' dim=None, what vqzoo logged before) is far off here
    pooled = numpy_pooled_psnr(pairs)
    assert abs(expected - pooled) > 5.0, (expected, pooled)
    assert metric.compute().item() != pytest.approx(pooled, abs=1.0)


def test_psnr_of_one_known_image() -> None:
    target = torch.zeros(1, 1, 4, 4)
    metric = per_image_psnr()
    metric.update(torch.full_like(target, 0.1), target)  # MSE 0.01 -> 20 dB
    metric.update(torch.full((1, 1, 4, 4), 0.01), target)  # MSE 1e-4 -> 40 dB
    assert metric.compute().item() == pytest.approx(30.0, abs=1e-4)  # pooled: 22.97 dB


def test_ssim_equals_torchmetrics_functional_on_the_concatenated_batches() -> None:
    pairs = batches(seed=1, channels=3)
    metric = per_image_ssim()
    for prediction, target in pairs:
        metric.update(prediction, target)
    predictions = torch.cat([p for p, _ in pairs])
    targets = torch.cat([t for _, t in pairs])
    expected = structural_similarity_index_measure(predictions, targets, data_range=1.0)
    assert metric.compute().item() == pytest.approx(expected.item(), abs=1e-6)
    per_image = structural_similarity_index_measure(
        predictions, targets, data_range=1.0, reduction="none"
    )
    assert expected.item() == pytest.approx(per_image.mean().item(), abs=1e-6)
    identical = per_image_ssim()
    identical.update(targets, targets)
    assert identical.compute().item() == pytest.approx(1.0, abs=1e-6)


def test_tokenizer_logs_per_image_psnr_and_ssim_on_eval_stages() -> None:
    torch.manual_seed(0)
    model = ImageTokenizer(
        in_channels=1, quantizer={"name": "fsq", "levels": [8, 5, 5]}, channels=(16, 32)
    )
    model.eval()
    assert "ssim" not in model.metrics_for("train")  # SSIM is computed on val / test only
    assert {"val/psnr", "val/ssim"} <= set(model.epoch_metric_names("val"))
    assert {"test/psnr", "test/ssim"} <= set(model.epoch_metric_names("test"))
    pairs = []
    with torch.no_grad():
        for size in SIZES:
            images = torch.rand(size, 1, 16, 16).round()
            out = model.shared_step(images, "val")
            pairs.append((out["reconstructions"], images))
    metrics = model.metrics_for("val")
    assert metrics["psnr"].compute().item() == pytest.approx(
        numpy_per_image_mean_psnr(pairs), abs=1e-3
    )
    expected_ssim = structural_similarity_index_measure(
        torch.cat([p for p, _ in pairs]), torch.cat([t for _, t in pairs]), data_range=1.0
    )
    assert metrics["ssim"].compute().item() == pytest.approx(expected_ssim.item(), abs=1e-6)
