"""ResidualSimVQ: shapes, per-layer SimVQ on residuals, exact decoding, dropout, training."""

from __future__ import annotations

import torch

from src.quantizers import ResidualSimVQ, build_quantizer


def test_shapes_registry_and_exact_decoding() -> None:
    quantizer = build_quantizer("rsimvq", dim=32, num_quantizers=4, codebook_size=256)
    assert isinstance(quantizer, ResidualSimVQ)
    assert quantizer.codebook_size == 256 and quantizer.num_codebooks == 4
    quantizer.eval()
    x = torch.randn(2, 100, 32)
    quantized, indices, loss = quantizer(x)
    assert quantized.shape == (2, 100, 32)
    assert indices.shape == (2, 100, 4)
    assert loss.shape == (4,)
    assert torch.equal(quantizer.get_output_from_indices(indices), quantized)
    assert quantizer.get_codes_from_indices(indices).shape == (4, 2, 100, 32)


def test_each_layer_is_the_nearest_code_of_its_residual() -> None:
    torch.manual_seed(0)
    quantizer = ResidualSimVQ(dim=8, num_quantizers=3, codebook_size=64).eval()
    x = torch.randn(1, 50, 8)
    _, indices, _ = quantizer(x)
    residual = x.clone()
    for layer, layer_indices in zip(quantizer.layers, indices.unbind(-1), strict=True):
        codebook = layer.codebook.detach()
        expected = torch.cdist(residual.double(), codebook.double()).argmin(-1)
        assert torch.equal(layer_indices, expected)
        residual = residual - codebook[layer_indices]
    # the sum of layers gets closer to the input as layers are added
    errors = []
    for kept in range(1, 4):
        partial = indices.clone()
        partial[..., kept:] = -1
        errors.append((quantizer.get_output_from_indices(partial) - x).pow(2).mean().item())
    assert errors[0] > errors[1] > errors[2]


def test_channel_first_and_quantize_dropout() -> None:
    torch.manual_seed(0)
    quantizer = ResidualSimVQ(
        dim=8, num_quantizers=4, codebook_size=32, channel_first=True, quantize_dropout=True
    )
    x = torch.randn(2, 8, 5, 5)
    seen = set()
    for _ in range(30):
        quantized, indices, loss = quantizer(x)
        assert quantized.shape == x.shape and indices.shape == (2, 5, 5, 4)
        kept = int((indices[0, 0, 0] >= 0).sum())
        assert (indices[..., kept:] == -1).all() and (loss[kept:] == 0).all()
        seen.add(kept)
    assert len(seen) > 1
    quantizer.eval()
    quantized, indices, _ = quantizer(x)
    assert torch.equal(quantizer.get_output_from_indices(indices), quantized)


def test_every_layer_map_trains_and_frozen_codebooks_stay() -> None:
    torch.manual_seed(0)
    quantizer = ResidualSimVQ(dim=8, num_quantizers=3, codebook_size=32)
    frozen = [layer.frozen_codebook.clone() for layer in quantizer.layers]
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=1e-2)
    x = torch.randn(2, 40, 8, requires_grad=True)
    quantized, _, loss = quantizer(x)
    ((quantized - x.detach()).pow(2).mean() + loss.sum()).backward()
    for layer in quantizer.layers:
        assert layer.code_transform.weight.grad.abs().sum() > 0
    optimizer.step()
    for layer, before in zip(quantizer.layers, frozen, strict=True):
        assert torch.equal(layer.frozen_codebook, before)
