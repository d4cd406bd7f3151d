"""Audio losses and metrics: zero at identity, growing with noise, SI-SNR and bitrate values."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.audio import ScaleInvariantSignalNoiseRatio
from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio as si_snr

from src.models.audio_losses import (
    MultiResolutionSTFTLoss,
    MultiScaleMelLoss,
    bitrate_kbps,
)


def speechlike(batch: int = 2, samples: int = 8000, seed: int = 0) -> torch.Tensor:
    """A few harmonics under a slow envelope, (batch, 1, samples) at 8 kHz."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 8000
    f0 = 120 + 80 * torch.rand(batch, 1, generator=g)
    wave = sum(torch.sin(2 * math.pi * k * f0 * t) / k for k in range(1, 6))
    return (0.3 * wave * torch.sin(math.pi * t / t[-1])).unsqueeze(1)


@pytest.mark.parametrize(
    "loss", [MultiScaleMelLoss(8000), MultiResolutionSTFTLoss()], ids=["mel", "stft"]
)
def test_spectral_losses_are_zero_for_identical_signals_and_grow_with_noise(loss) -> None:
    clean = speechlike()
    assert loss(clean, clean).item() == pytest.approx(0.0, abs=1e-6)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    values = [loss(clean + level * noise, clean).item() for level in (0.001, 0.01, 0.1)]
    assert 0 < values[0] < values[1] < values[2]


def hand_si_snr(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SI-SNR by its definition: 10 log10(|s|^2 / |e - s|^2), s the projection of the
    zero-mean estimate e on the zero-mean target."""
    estimate = estimate - estimate.mean(-1, keepdim=True)
    target = target - target.mean(-1, keepdim=True)
    projection = (estimate * target).sum(-1, keepdim=True) / target.pow(2).sum(-1, keepdim=True)
    projection = projection * target
    return 10 * torch.log10(projection.pow(2).sum(-1) / (estimate - projection).pow(2).sum(-1))


def test_si_snr_matches_a_hand_computed_value() -> None:
    target = torch.tensor([1.0, -1.0, 1.0, -1.0])  # zero mean, |s|^2 = 4
    noise = torch.tensor([1.0, 1.0, -1.0, -1.0])  # zero mean, orthogonal to target, |n|^2 = 4
    estimate = 2 * target + 0.5 * noise  # projection 2s (|.|^2 = 16), residual |.|^2 = 1
    assert si_snr(estimate, target).item() == pytest.approx(10 * math.log10(16 / 1), abs=1e-4)
    # scale and offset of the estimate do not matter
    assert si_snr(7 * estimate + 3, target).item() == pytest.approx(12.0412, abs=1e-3)


def test_si_snr_per_signal_of_a_batch_equals_the_definition() -> None:
    clean = speechlike(batch=3).squeeze(1)
    noisy = clean + 0.01 * torch.randn_like(clean)
    values = si_snr(noisy, clean)
    assert values.shape == (3,)
    assert bool((values > 20).all())
    torch.testing.assert_close(values, hand_si_snr(noisy.double(), clean.double()).float())


def test_epoch_si_snr_metric_is_the_mean_over_windows() -> None:
    """The tokenizer's metric (torchmetrics' ScaleInvariantSignalNoiseRatio) averages every
    window of every batch, as the mean of the per-window definition."""
    metric = ScaleInvariantSignalNoiseRatio()
    clean = speechlike(batch=5).squeeze(1)
    noisy = clean + 0.05 * torch.randn_like(clean)
    metric.update(noisy[:2], clean[:2])
    metric.update(noisy[2:], clean[2:])
    expected = hand_si_snr(noisy.double(), clean.double()).mean().float()
    torch.testing.assert_close(metric.compute(), expected, rtol=1e-5, atol=1e-5)


def test_bitrate_formula_on_known_configs() -> None:
    # SoundStream-like: 320x hop at 8 kHz = 25 frames/s, 4 codebooks of 1024 codes = 1 kbps
    assert bitrate_kbps(4, 1024, 8000 / 320) == pytest.approx(1.0)
    # the audio_rvq experiment: hop 40 at 8 kHz, 5 codebooks of 256 codes = 8 kbps
    assert bitrate_kbps(5, 256, 8000 / 40) == pytest.approx(8.0)
    assert bitrate_kbps(1, 1000, 100) == pytest.approx(math.log2(1000) / 10)
