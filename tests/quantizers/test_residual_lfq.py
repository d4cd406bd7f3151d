"""ResidualLFQ / GroupedResidualLFQ: the guide's example, exact decoding, layer scales, masks."""

from __future__ import annotations

import pytest
import torch

from src.quantizers.residual_lfq import GroupedResidualLFQ, ResidualLFQ


def test_guide_example() -> None:
    residual_lfq = ResidualLFQ(dim=256, codebook_size=256, num_quantizers=8)
    x = torch.randn(1, 1024, 256)
    residual_lfq.eval()
    quantized, indices, commit_loss = residual_lfq(x)
    assert quantized.shape == (1, 1024, 256)
    assert indices.shape == (1, 1024, 8)
    assert commit_loss.shape == (8,)
    quantized_out = residual_lfq.get_output_from_indices(indices)
    assert quantized_out.shape == (1, 1024, 256)
    assert torch.all(quantized == quantized_out)


def test_layers_quantize_successive_residuals_with_halving_scales() -> None:
    """Brute force: layer i takes the signs of what layers < i left, codes +-2^-i."""
    quantizer = ResidualLFQ(dim=6, codebook_size=64, num_quantizers=3).eval()
    x = torch.randn(2, 9, 6)
    quantized, indices, _ = quantizer(x)
    residual, total = x.clone(), torch.zeros_like(x)
    weights = 2 ** torch.arange(5, -1, -1)
    for i in range(3):
        code = torch.where(residual > 0, 2.0**-i, -(2.0**-i))
        assert torch.equal(indices[..., i], ((residual > 0).long() * weights).sum(-1))
        total, residual = total + code, residual - code
    torch.testing.assert_close(quantized, total)
    codes = quantizer.get_codes_from_indices(indices)
    assert codes.shape == (3, 2, 9, 6)
    torch.testing.assert_close(codes.sum(0), total)
    *_, all_codes = quantizer(x, return_all_codes=True)
    assert torch.equal(all_codes, codes)


def test_training_losses_and_gradients() -> None:
    quantizer = ResidualLFQ(dim=32, codebook_size=16, num_quantizers=4, commitment_loss_weight=0.25)
    x = torch.randn(2, 49, 32, requires_grad=True)
    out = quantizer(x)
    assert out.loss.shape == (4,) and torch.isfinite(out.loss).all()
    assert (out.loss != 0).all()
    (out.quantized.sum() + out.loss.sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert quantizer.num_codebooks == 4 and quantizer.codebook_size == 16


def test_mask_reaches_every_layer() -> None:
    quantizer = ResidualLFQ(dim=5, codebook_size=32, num_quantizers=2).double()
    x = torch.randn(2, 8, 5, dtype=torch.float64)
    mask = torch.rand(2, 8) > 0.5
    masked = quantizer(x, mask=mask).commit_loss
    kept = quantizer(x[mask].unsqueeze(0)).commit_loss
    torch.testing.assert_close(masked, kept)


def test_quantize_dropout_marks_dropped_layers() -> None:
    torch.manual_seed(0)
    quantizer = ResidualLFQ(dim=8, codebook_size=256, num_quantizers=4, quantize_dropout=True)
    seen = set()
    for _ in range(20):
        indices = quantizer(torch.randn(1, 10, 8)).indices
        kept = int((indices[0, 0] >= 0).sum())
        assert (indices[..., kept:] == -1).all() and (indices[..., :kept] >= 0).all()
        seen.add(kept)
    assert len(seen) > 1
    quantizer.eval()
    x = torch.randn(1, 10, 8)
    indices = quantizer(x).indices
    coarse = quantizer.get_output_from_indices(indices[..., :2])
    assert torch.equal(coarse, quantizer.get_codes_from_indices(indices)[:2].sum(0))


def test_grouped_shapes_and_exact_decoding() -> None:
    quantizer = GroupedResidualLFQ(dim=256, groups=2, codebook_size=256, num_quantizers=8)
    quantizer.eval()
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = quantizer(x)
    assert quantized.shape == (1, 1024, 256)
    assert indices.shape == (2, 1, 1024, 8)
    assert commit_loss.shape == (2, 8)
    assert torch.all(quantized == quantizer.get_output_from_indices(indices))
    first = ResidualLFQ(dim=128, codebook_size=256, num_quantizers=8).eval()
    first.load_state_dict(quantizer.rvqs[0].state_dict())
    assert torch.equal(first(x[..., :128]).indices, indices[0])


def test_grouped_image_fmap() -> None:
    quantizer = GroupedResidualLFQ(
        dim=32, groups=2, codebook_size=16, num_quantizers=3, accept_image_fmap=True
    ).eval()
    x = torch.randn(2, 32, 7, 7)
    quantized, indices, _ = quantizer(x)
    assert quantized.shape == x.shape and indices.shape == (2, 2, 7, 7, 3)
    assert torch.equal(quantized, quantizer.get_output_from_indices(indices))
    assert quantizer.num_codebooks == 6


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="power of two"):
        ResidualLFQ(dim=8, codebook_size=100, num_quantizers=2)
    with pytest.raises(ValueError, match="num_codebooks"):
        ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2, num_codebooks=2)
    with pytest.raises(ValueError, match="groups"):
        GroupedResidualLFQ(dim=10, groups=3, codebook_size=16, num_quantizers=2)
    quantizer = ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2)
    with pytest.raises(ValueError, match=r"\(batch, seq, dim=8\)"):
        quantizer(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="q <= 2"):
        quantizer.get_output_from_indices(torch.zeros(1, 4, 3, dtype=torch.long))
