"""ResidualFSQ / GroupedResidualFSQ: the guide's example, refinement, exact decoding, dropout."""

from __future__ import annotations

import itertools

import pytest
import torch

from src.quantizers import FSQ, GroupedResidualFSQ, ResidualFSQ, build_quantizer


def test_guide_example() -> None:
    residual_fsq = ResidualFSQ(dim=256, levels=[8, 5, 5, 3], num_quantizers=8)
    x = torch.randn(1, 1024, 256)
    residual_fsq.eval()
    quantized, indices = residual_fsq(x)
    assert quantized.shape == (1, 1024, 256)
    assert indices.shape == (1, 1024, 8)
    quantized_out = residual_fsq.get_output_from_indices(indices)
    assert quantized_out.shape == (1, 1024, 256)
    assert torch.all(quantized == quantized_out)


def test_registered_and_attributes() -> None:
    quantizer = build_quantizer("rfsq", levels=[8, 6, 5], num_quantizers=3, dim=32)
    assert isinstance(quantizer, ResidualFSQ)
    assert quantizer.codebook_size == 240 and quantizer.num_codebooks == 3
    grouped = build_quantizer("grfsq", dim=32, groups=2, levels=[8, 6, 5], num_quantizers=3)
    assert isinstance(grouped, GroupedResidualFSQ)
    assert grouped.codebook_size == 240 and grouped.num_codebooks == 6


def test_one_layer_is_exactly_fsq() -> None:
    levels = [8, 5, 5, 3]
    x = torch.randn(3, 200, 4) * 2
    q_fsq, i_fsq = FSQ(levels=levels)(x)
    q_res, i_res = ResidualFSQ(levels=levels, num_quantizers=1)(x)
    assert torch.equal(q_res, q_fsq)
    assert torch.equal(i_res[..., 0], i_fsq)


@pytest.mark.parametrize("levels", [[8, 5, 5, 3], [4, 6], [2, 7]])
def test_residual_error_shrinks_with_every_layer(levels: list[int]) -> None:
    depth = 5
    quantizer = ResidualFSQ(levels=levels, num_quantizers=depth).eval()
    x = torch.randn(4, 300, len(levels)) * 1.5
    _, indices = quantizer(x)
    level_t = torch.tensor(levels, dtype=torch.float32)
    half_width = torch.div(level_t, 2, rounding_mode="floor")
    divisor = torch.where(level_t % 2 == 1, level_t, level_t - 1)
    target = quantizer.fsq.bound(x) / half_width  # the value layer 0 rounds, in code units
    previous, means = None, []
    for kept in range(1, depth + 1):
        partial = indices.clone()
        partial[..., kept:] = -1
        error = (quantizer.get_output_from_indices(partial) - target).abs()
        # each layer's grid covers the previous half-step interval with `divisor` times finer
        # steps, so the worst case shrinks by `divisor` per layer
        bound = 0.5 / half_width / divisor ** (kept - 1)
        assert (error <= bound + 1e-5).all()
        if previous is not None:  # every grid holds zero: no token's error ever grows
            assert (error <= previous + 1e-6).all()
        previous = error
        means.append(error.mean().item())
    assert all(a > b for a, b in itertools.pairwise(means))


def test_get_output_from_indices_exact_with_projection_and_channel_first() -> None:
    quantizer = ResidualFSQ(dim=12, levels=[8, 5, 5], num_quantizers=4, is_channel_first=True)
    quantizer.eval()
    x = torch.randn(2, 12, 8, 8)
    quantized, indices = quantizer(x)
    assert quantized.shape == x.shape and indices.shape == (2, 8, 8, 4)
    assert torch.equal(quantizer.get_output_from_indices(indices), quantized)
    codes = quantizer.get_codes_from_indices(indices)
    assert codes.shape == (4, 2, 8, 8, 3)


def test_quantize_dropout_marks_dropped_layers_minus_one() -> None:
    torch.manual_seed(0)
    quantizer = ResidualFSQ(levels=[5, 5], num_quantizers=6, quantize_dropout=True).train()
    x = torch.randn(2, 50, 2)
    kept_counts = set()
    for _ in range(40):
        quantized, indices = quantizer(x)
        dropped = indices[0, 0] == -1
        kept = int((~dropped).sum())
        assert (indices[..., :kept] >= 0).all() and (indices[..., kept:] == -1).all()
        kept_counts.add(kept)
        # the output is the sum of the kept layers only
        quantizer.eval()
        assert torch.equal(quantizer.get_output_from_indices(indices), quantized)
        quantizer.train()
    assert len(kept_counts) > 1 and min(kept_counts) >= 1
    quantizer.eval()
    assert (quantizer(x).indices >= 0).all()  # no dropout in eval


def test_gradient_is_the_fsq_straight_through_gradient() -> None:
    levels = [8, 5, 3]
    x = (torch.randn(2, 30, 3) * 2).requires_grad_()
    quantized, _ = ResidualFSQ(levels=levels, num_quantizers=4)(x)
    upstream = torch.randn_like(quantized)
    (quantized * upstream).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    q_ref, _ = FSQ(levels=levels)(x_ref)
    (q_ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_bf16_autocast_gives_float32_indices() -> None:
    quantizer = ResidualFSQ(dim=16, levels=[8, 5, 5, 5], num_quantizers=3)
    x = torch.randn(2, 64, 16)
    _, reference = quantizer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, indices = quantizer(x)
    assert torch.isfinite(quantized).all()
    # the bf16 projection changes the latents slightly; most tokens keep their codes
    assert (indices == reference).float().mean() > 0.5


def test_grouped_shapes_and_exact_decoding() -> None:
    quantizer = GroupedResidualFSQ(dim=256, groups=2, levels=[8, 5, 5, 3], num_quantizers=4)
    quantizer.eval()
    x = torch.randn(1, 1024, 256)
    quantized, indices = quantizer(x)
    assert quantized.shape == (1, 1024, 256)
    assert indices.shape == (2, 1, 1024, 4)
    assert torch.all(quantizer.get_output_from_indices(indices) == quantized)
    # each group is its own residual FSQ on its half of the channels
    for g in range(2):
        part, part_indices = quantizer.rfsqs[g](x[..., 128 * g : 128 * (g + 1)])
        assert torch.equal(part_indices, indices[g])
        assert torch.equal(part, quantized[..., 128 * g : 128 * (g + 1)])


def test_grouped_image_maps_and_shared_dropout_depth() -> None:
    torch.manual_seed(0)
    quantizer = GroupedResidualFSQ(
        dim=8,
        groups=2,
        levels=[5, 5],
        num_quantizers=4,
        accept_image_fmap=True,
        quantize_dropout=True,
    )
    x = torch.randn(2, 8, 4, 4)
    quantized, indices = quantizer(x)
    assert quantized.shape == x.shape and indices.shape == (2, 2, 4, 4, 4)
    assert torch.equal((indices[0] == -1), (indices[1] == -1))


def test_bad_input_names_layout() -> None:
    with pytest.raises(ValueError, match=r"channel-last \(batch, \.\.\., dim=4\)"):
        ResidualFSQ(levels=[8, 5, 5, 3], num_quantizers=2)(torch.randn(2, 4, 7))
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualFSQ(levels=[8, 5], num_quantizers=0)
    with pytest.raises(ValueError, match="groups"):
        GroupedResidualFSQ(dim=10, groups=3, levels=[5], num_quantizers=2)
