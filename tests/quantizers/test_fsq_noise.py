"""FSQ noise_dropout: uniform rounding noise in training on a fraction of elements only."""

from __future__ import annotations

import math

import pytest
import torch

from src.quantizers import FSQ

LEVELS = [8, 5, 4]


def _unrounded_codes(quantizer: FSQ, z: torch.Tensor) -> torch.Tensor:
    """The bounded value before rounding, on the code scale [-1, 1]."""
    half_width = torch.tensor([lv // 2 for lv in quantizer.levels], dtype=torch.float32)
    return quantizer.bound(z) / half_width


def test_eval_and_zero_probability_round_every_element() -> None:
    torch.manual_seed(0)
    z = torch.randn(512, 3) * 2
    plain = FSQ(levels=LEVELS)
    noisy = FSQ(levels=LEVELS, noise_dropout=0.7).eval()
    assert torch.equal(noisy(z).quantized, plain(z).quantized)
    assert torch.equal(FSQ(levels=LEVELS, noise_dropout=0.0)(z).quantized, plain(z).quantized)


def test_noise_replaces_rounding_by_at_most_half_a_level_and_keeps_hard_indices() -> None:
    torch.manual_seed(0)
    z = torch.randn(4096, 3) * 2
    quantizer = FSQ(levels=LEVELS, noise_dropout=1.0)
    quantized, indices = quantizer(z)
    half_width = torch.tensor([lv // 2 for lv in LEVELS], dtype=torch.float32)
    level_error = (quantized - _unrounded_codes(quantizer, z)) * half_width
    assert level_error.min() >= -0.5 - 1e-5 and level_error.max() < 0.5 + 1e-5
    # the noise is uniform over one level: its mean is ~0 and its variance ~1/12
    assert abs(level_error.mean().item()) < 0.02
    assert abs(level_error.var().item() - 1 / 12) < 0.005
    assert torch.equal(indices, quantizer.eval()(z).indices)


def test_fraction_of_noisy_elements_follows_the_probability() -> None:
    torch.manual_seed(0)
    z = torch.randn(20000, 3) * 2
    quantizer = FSQ(levels=LEVELS, noise_dropout=0.3)
    quantized, indices = quantizer(z)
    noisy = quantized != quantizer.indices_to_codes(indices)
    assert abs(noisy.float().mean().item() - 0.3) < 0.01
    # per element independently: noisy elements are spread over the channels alike
    assert torch.allclose(noisy.float().mean(0), torch.full((3,), 0.3), atol=0.02)


def test_gradient_is_the_bound_slope_whether_rounded_or_noisy() -> None:
    torch.manual_seed(0)
    z = (torch.randn(256, 3) * 2).requires_grad_()
    weights = torch.randn(256, 3)
    quantized, _ = FSQ(levels=LEVELS, noise_dropout=0.5)(z)
    (quantized * weights).sum().backward()
    z_ref = z.detach().clone().requires_grad_()
    (_unrounded_codes(FSQ(levels=LEVELS), z_ref) * weights).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-5, atol=1e-6)


def test_noise_under_bf16_autocast_keeps_indices_exact() -> None:
    torch.manual_seed(0)
    z = torch.randn(2, 64, 3) * 2
    quantizer = FSQ(levels=LEVELS, noise_dropout=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, indices = quantizer(z)
    assert torch.equal(indices, quantizer.eval()(z).indices)
    assert indices.max() < math.prod(LEVELS)


@pytest.mark.parametrize("probability", [-0.1, 1.5])
def test_bad_probability_names_the_range(probability: float) -> None:
    with pytest.raises(ValueError, match=r"noise_dropout .* \[0, 1\]"):
        FSQ(levels=LEVELS, noise_dropout=probability)
