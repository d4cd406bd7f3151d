"""FSQ: the guide's examples, exact index arithmetic, rounding, gradients and layouts."""

from __future__ import annotations

import math

import pytest
import torch

from src.quantizers import FSQ, FSQOutput, build_quantizer


def _bounded_reference(z: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """The paper's bound f(z), written out per channel in float64."""
    out = torch.empty_like(z, dtype=torch.float64)
    for i, level in enumerate(levels):
        half_l = (level - 1) * (1 + 1e-3) / 2
        offset = 0.5 if level % 2 == 0 else 0.0
        shift = math.atanh(offset / half_l)
        out[..., i] = torch.tanh(z[..., i].double() + shift) * half_l - offset
    return out


def test_guide_example_shapes_and_decode() -> None:
    quantizer = FSQ(levels=[8, 5, 5, 5])
    x = torch.randn(1, 1024, 4)
    xhat, indices = quantizer(x)
    assert xhat.shape == (1, 1024, 4)
    assert indices.shape == (1, 1024)
    assert indices.dtype == torch.int64
    assert torch.all(xhat == quantizer.indices_to_codes(indices))


def test_guide_example_without_indices() -> None:
    quantizer = FSQ(levels=[8, 5, 5, 5], return_indices=False)
    xhat, indices = quantizer(torch.randn(1, 1024, 4))
    assert xhat.shape == (1, 1024, 4)
    assert indices is None


def test_registered_and_output_fields() -> None:
    quantizer = build_quantizer("fsq", levels=[8, 5, 5, 5])
    assert isinstance(quantizer, FSQ)
    assert quantizer.codebook_size == 1000
    assert quantizer.num_codebooks == 1
    out = quantizer(torch.randn(2, 3, 4))
    assert isinstance(out, FSQOutput)
    assert out._fields == ("quantized", "indices")


def test_every_code_of_8555_is_reachable() -> None:
    quantizer = FSQ(levels=[8, 5, 5, 5])
    # Grid step 0.2 is below the narrowest level's input width (~0.29, the middle level of 8).
    axis = torch.linspace(-4, 4, 41)
    z = torch.cartesian_prod(axis, axis, axis, axis)
    _, indices = quantizer(z)
    assert indices.unique().numel() == 1000
    assert indices.min() == 0 and indices.max() == 999


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [3, 4, 7], [2, 2]])
def test_indices_codes_round_trip_over_all_codes(levels: list[int]) -> None:
    quantizer = FSQ(levels=levels)
    size = math.prod(levels)
    indices = torch.arange(size)
    codes = quantizer.indices_to_codes(indices)
    assert codes.shape == (size, len(levels))
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(quantizer.codes_to_indices(codes), indices)
    # The grid is exactly the product of each channel's levels.
    for i, level in enumerate(levels):
        half_width = level // 2
        expected = (torch.arange(level) - half_width) / half_width
        assert torch.equal(codes[:, i].unique(), expected)
    assert torch.equal(quantizer.implicit_codebook, codes)


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [3, 4, 7], [2, 6]])
def test_quantized_is_nearest_grid_point_of_bounded_value(levels: list[int]) -> None:
    quantizer = FSQ(levels=levels)
    z = torch.randn(4096, len(levels)) * 2
    quantized, indices = quantizer(z)
    bounded = _bounded_reference(z, levels)
    grid = torch.cartesian_prod(*[torch.arange(lv) - lv // 2 for lv in levels]).double()
    grid = grid.reshape(-1, len(levels))
    nearest = grid[torch.cdist(bounded, grid).argmin(dim=1)]
    half_width = torch.tensor([lv // 2 for lv in levels], dtype=torch.float32)
    assert torch.equal(quantized, nearest.float() / half_width)
    assert torch.equal(quantizer.codes_to_indices(quantized), indices)


def test_bf16_autocast_indices_equal_float32_indices() -> None:
    quantizer = FSQ(levels=[8, 5, 5, 5])
    x = torch.randn(8, 256, 4) * 2
    _, ref = quantizer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, indices = quantizer(x)
    assert torch.equal(indices, ref)
    # A bf16 input is quantized in float32 and handed back in bf16.
    x_bf16 = x.bfloat16()
    _, ref_bf16 = quantizer(x_bf16.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, indices = quantizer(x_bf16)
    assert quantized.dtype == torch.bfloat16
    assert torch.equal(indices, ref_bf16)
    assert torch.equal(quantizer.codes_to_indices(quantized), indices)


def test_straight_through_gradient_is_gradient_of_bound() -> None:
    levels = [8, 5, 3]
    quantizer = FSQ(levels=levels)
    z = (torch.randn(64, 3) * 2).requires_grad_()
    weights = torch.randn(64, 3)
    quantized, _ = quantizer(z)
    (quantized * weights).sum().backward()

    z_ref = z.detach().double().requires_grad_()
    half_width = torch.tensor([lv // 2 for lv in levels], dtype=torch.float64)
    (_bounded_reference(z_ref, levels) / half_width * weights).sum().backward()
    torch.testing.assert_close(z.grad.double(), z_ref.grad, rtol=1e-5, atol=1e-6)


def test_projections_when_dim_differs() -> None:
    quantizer = FSQ(levels=[8, 5, 5, 5], dim=16)
    assert isinstance(quantizer.project_in, torch.nn.Linear)
    x = torch.randn(2, 10, 16, requires_grad=True)
    quantized, indices = quantizer(x)
    assert quantized.shape == (2, 10, 16)
    assert indices.shape == (2, 10)
    torch.testing.assert_close(quantizer.indices_to_codes(indices), quantized)
    quantized.sum().backward()
    assert quantizer.project_in.weight.grad is not None
    assert x.grad is not None


def test_projection_without_bias() -> None:
    quantizer = FSQ(levels=[5, 5], dim=6, projection_has_bias=False)
    assert quantizer.project_in.bias is None and quantizer.project_out.bias is None


def test_multiple_codebooks() -> None:
    quantizer = FSQ(levels=[8, 5, 5, 5], num_codebooks=2)
    assert quantizer.dim == 8
    x = torch.randn(2, 10, 8)
    quantized, indices = quantizer(x)
    assert quantized.shape == (2, 10, 8)
    assert indices.shape == (2, 10, 2)
    # Each codebook quantizes its own chunk with the single-codebook rule.
    single = FSQ(levels=[8, 5, 5, 5])
    for c in range(2):
        q_c, i_c = single(x[..., 4 * c : 4 * c + 4])
        assert torch.equal(indices[..., c], i_c)
        assert torch.equal(quantized[..., 4 * c : 4 * c + 4], q_c)
    assert torch.equal(quantizer.indices_to_codes(indices), quantized)


def test_keep_num_codebooks_dim_with_one_codebook() -> None:
    quantizer = FSQ(levels=[5, 5], keep_num_codebooks_dim=True)
    quantized, indices = quantizer(torch.randn(3, 7, 2))
    assert indices.shape == (3, 7, 1)
    assert torch.equal(quantizer.indices_to_codes(indices), quantized)
    with pytest.raises(ValueError, match="num_codebooks=1"):
        FSQ(levels=[5, 5], num_codebooks=2, keep_num_codebooks_dim=False)


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 4, 3, 8, 8)])
def test_channel_first_maps(shape: tuple[int, ...]) -> None:
    quantizer = FSQ(levels=[8, 5, 5, 5], channel_first=True)
    x = torch.randn(shape)
    quantized, indices = quantizer(x)
    assert quantized.shape == shape
    assert indices.shape == (shape[0], *shape[2:])
    # Same as quantizing the channel-last view.
    q_last, i_last = FSQ(levels=[8, 5, 5, 5])(x.movedim(1, -1))
    assert torch.equal(indices, i_last)
    assert torch.equal(quantized, q_last.movedim(-1, 1))
    assert torch.equal(quantizer.indices_to_codes(indices), quantized)


def test_huge_codebook_without_indices() -> None:
    levels = [4] * 32  # 2**64 codes: more than int64 indices can number
    quantizer = FSQ(levels=levels, return_indices=False)
    assert quantizer.codebook_size == 2**64
    quantized, indices = quantizer(torch.randn(2, 5, 32))
    assert indices is None
    assert quantized.shape == (2, 5, 32)
    assert set(quantized.unique().tolist()) <= {-1.0, -0.5, 0.0, 0.5}
    with pytest.raises(ValueError, match="return_indices=False"):
        FSQ(levels=levels)


def test_largest_int64_indexable_codebook() -> None:
    quantizer = FSQ(levels=[2] * 63)  # 2**63 codes: index 2**63 - 1 still fits int64
    z = torch.full((1, 63), 5.0)
    _, indices = quantizer(z)
    assert indices.item() == 2**63 - 1
    assert torch.equal(quantizer.codes_to_indices(quantizer.indices_to_codes(indices)), indices)


def test_wrong_feature_size_names_expected_layout() -> None:
    quantizer = FSQ(levels=[8, 5, 5, 5])
    with pytest.raises(ValueError) as info:
        quantizer(torch.randn(1, 4, 32, 32))
    message = str(info.value)
    assert "channel-last input (..., dim=4)" in message
    assert "(1, 4, 32, 32)" in message
    assert "channel_first=True" in message
    with pytest.raises(ValueError, match=r"channel_first=True\) expects \(batch, dim=4"):
        FSQ(levels=[8, 5, 5, 5], channel_first=True)(torch.randn(1, 32, 32, 4))


@pytest.mark.parametrize("levels", [[], [1, 5], [8, 0]])
def test_bad_levels(levels: list[int]) -> None:
    with pytest.raises(ValueError, match="levels"):
        FSQ(levels=levels)


def test_no_parameters_and_no_checkpoint_state() -> None:
    quantizer = FSQ(levels=[8, 5, 5, 5])
    assert list(quantizer.parameters()) == []
    assert quantizer.state_dict() == {}


def test_exhaustive_small_grid_input() -> None:
    """A dense grid of inputs over a wide range hits each code of [3, 4] at least once."""
    axis = torch.linspace(-6, 6, 241)
    z = torch.cartesian_prod(axis, axis)
    _, indices = FSQ(levels=[3, 4])(z)
    assert indices.unique().tolist() == list(range(12))


@pytest.mark.parametrize("dim", [4, 8])
def test_every_code_of_8555_reachable_in_bf16_training(dim: int) -> None:
    """Under bf16 autocast (a bf16 projection in front when dim=8) all 1000 codes are hit."""
    quantizer = FSQ(levels=[8, 5, 5, 5], dim=dim).train()
    if dim != 4:
        with torch.no_grad():  # pass the first 4 channels straight to the quantizer
            quantizer.project_in.weight.copy_(torch.eye(4, dim))
            quantizer.project_in.bias.zero_()
    axis = torch.linspace(-4, 4, 41)
    z = torch.cartesian_prod(axis, axis, axis, axis)
    z = torch.cat([z, torch.randn(z.shape[0], dim - 4)], dim=-1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, indices = quantizer(z)
        assert dim == 4 or quantizer.project_in(z).dtype == torch.bfloat16
    assert indices.unique().numel() == 1000
    assert indices.min() == 0 and indices.max() == 999
    quantized.float().sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_return_indices_false_skips_index_work_for_large_codebooks() -> None:
    quantizer = FSQ(levels=[4] * 16, return_indices=False)
    quantized, indices = quantizer(torch.randn(2, 9, 16))
    assert indices is None
    assert set(quantized.unique().tolist()) <= {-1.0, -0.5, 0.0, 0.5}
