"""ResidualFSQ's `soft_clamp_input_value` and `bound_hard_clamp` (the reference's keywords,
issue 17): the soft clamp equals clamping the input, the hard clamp bounds layer 0 by a clamp
after the reference's own soft clamp, and decoding stays exact."""

from __future__ import annotations

import pytest
import torch

from src.quantizers import FSQ, ResidualFSQ


def test_residual_fsq_soft_clamp_equals_clamping_the_input() -> None:
    torch.manual_seed(0)
    clamped = ResidualFSQ(
        levels=[8, 5, 5], num_quantizers=3, soft_clamp_input_value=[1.2, 1.5, 2.0]
    )
    plain = ResidualFSQ(levels=[8, 5, 5], num_quantizers=3)
    x = torch.randn(2, 50, 3) * 3
    c = torch.tensor([1.2, 1.5, 2.0])
    got, want = clamped.eval()(x), plain.eval()((x / c).tanh() * c)
    assert torch.equal(got.quantized, want.quantized) and torch.equal(got.indices, want.indices)
    assert torch.equal(clamped.get_output_from_indices(got.indices), got.quantized)


def test_residual_fsq_hard_clamp_bound_and_its_own_soft_clamp() -> None:
    levels = [8, 5, 5]
    rfsq = ResidualFSQ(levels=levels, num_quantizers=2, bound_hard_clamp=True).eval()
    expected = torch.tensor([1 + 1 / (lv - 1) for lv in levels])
    assert torch.equal(rfsq.soft_clamp_input_value, expected)
    x = torch.randn(2, 40, 3) * 3
    out = rfsq(x)
    soft = (x / expected).tanh() * expected
    layer0 = FSQ(levels=levels, bound_hard_clamp=True).bound(soft)
    # layer 0 rounds the clamp-bounded input; the refinement only lowers the error
    first = layer0.round() / rfsq.fsq._half_width
    assert (out.quantized - first).abs().max() <= 0.5 / rfsq.fsq._half_width.min()
    assert torch.equal(rfsq.get_output_from_indices(out.indices), out.quantized)
    with pytest.raises(ValueError, match="drop soft_clamp_input_value"):
        ResidualFSQ(
            levels=levels, num_quantizers=2, bound_hard_clamp=True, soft_clamp_input_value=1.5
        )
    with pytest.raises(ValueError, match="one per code channel"):
        ResidualFSQ(levels=levels, num_quantizers=2, soft_clamp_input_value=[1.0, 2.0])


def test_residual_fsq_return_all_codes_and_fixed_dropout_seed() -> None:
    torch.manual_seed(0)
    rfsq = ResidualFSQ(levels=[8, 5, 5], num_quantizers=3, quantize_dropout=True)
    x = torch.randn(2, 40, 3)
    out = rfsq.eval()(x, return_all_codes=True)
    assert out.all_codes.shape == (3, 2, 40, 3)
    # no projection (dim = len(levels)): the output is the sum of the layers' codes
    torch.testing.assert_close(out.all_codes.sum(0), out.quantized)
    assert torch.equal(rfsq.get_codes_from_indices(out.indices), out.all_codes)
    rfsq.train()
    depths = set()
    for seed in range(8):
        first = rfsq(x, rand_quantize_dropout_fixed_seed=seed).indices
        again = rfsq(x, rand_quantize_dropout_fixed_seed=seed).indices
        assert torch.equal(first, again)  # the seed fixes the kept depth
        kept = int((first[0, 0] >= 0).sum())
        depths.add(kept)
        dropped = rfsq(x, rand_quantize_dropout_fixed_seed=seed, return_all_codes=True)
        assert (dropped.all_codes[kept:] == 0).all()
    assert len(depths) > 1
