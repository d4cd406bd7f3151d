"""SimVQ: frozen codebook, learned map, brute-force nearest codes, exact decoding, losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.quantizers import SimVQ, SimVQOutput, build_quantizer


def _brute_force_indices(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin over codes of the float64 squared distance, one token at a time."""
    diffs = x.double().unsqueeze(-2) - codebook.double()
    return diffs.pow(2).sum(-1).argmin(-1)


def test_reference_example_with_mlp_transform_channel_first() -> None:
    # the reference module's own example, at a smaller width to stay fast
    sim_vq = SimVQ(
        dim=64,
        codebook_transform=nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)),
        codebook_size=1024,
        channel_first=True,
    )
    x = torch.randn(1, 64, 16, 16)
    quantized, indices, commit_loss = sim_vq(x)
    assert x.shape == quantized.shape
    assert indices.shape == (1, 16, 16)
    assert commit_loss.shape == ()
    assert torch.equal(sim_vq.indices_to_codes(indices), quantized)


def test_registered_fields_and_attributes() -> None:
    quantizer = build_quantizer("simvq", dim=16, codebook_size=300)
    assert isinstance(quantizer, SimVQ)
    assert quantizer.codebook_size == 300 and quantizer.num_codebooks == 1
    out = quantizer(torch.randn(2, 5, 16))
    assert isinstance(out, SimVQOutput)
    assert out._fields == ("quantized", "indices", "loss")


def test_indices_are_brute_force_nearest_of_transformed_codebook() -> None:
    torch.manual_seed(0)
    quantizer = SimVQ(dim=8, codebook_size=512, frozen_codebook_dim=5)
    x = torch.randn(4, 100, 8)
    quantized, indices, _ = quantizer(x)
    codebook = quantizer.code_transform(quantizer.frozen_codebook)
    assert codebook.shape == (512, 8)
    assert torch.equal(indices, _brute_force_indices(x, codebook))
    assert torch.equal(quantized, codebook[indices])
    assert torch.equal(quantizer.indices_to_codes(indices), quantized)


def test_loss_is_both_commitment_terms() -> None:
    quantizer = SimVQ(
        dim=8, codebook_size=64, input_to_quantize_commit_loss_weight=0.3, commitment_weight=2.0
    )
    x = torch.randn(3, 20, 8)
    quantized, _, loss = quantizer(x)
    mse = F.mse_loss(quantized, x).item()
    # both terms have the same value; they differ only in which side gets the gradient
    assert loss.item() == pytest.approx(2.0 * (1 + 0.3) * mse, rel=1e-5)


def test_codebook_buffer_frozen_and_map_trained() -> None:
    torch.manual_seed(0)
    quantizer = SimVQ(dim=8, codebook_size=128)
    assert "frozen_codebook" in dict(quantizer.named_buffers())
    assert all(p is not quantizer.frozen_codebook for p in quantizer.parameters())
    frozen_before = quantizer.frozen_codebook.clone()
    weight_before = quantizer.code_transform.weight.detach().clone()
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=1e-2)
    for _ in range(5):
        x = torch.randn(2, 64, 8, requires_grad=True)
        quantized, _, loss = quantizer(x)
        optimizer.zero_grad()
        ((quantized - x.detach()).pow(2).mean() + loss).backward()
        assert quantizer.code_transform.weight.grad.abs().sum() > 0
        assert x.grad is not None and x.grad.abs().sum() > 0
        optimizer.step()
    assert torch.equal(quantizer.frozen_codebook, frozen_before)
    assert not torch.equal(quantizer.code_transform.weight, weight_before)
    # decoding still matches the output after the map has moved
    quantized, indices, _ = quantizer(torch.randn(2, 64, 8))
    assert torch.equal(quantizer.indices_to_codes(indices), quantized)


def test_only_the_codebook_side_loss_trains_the_map() -> None:
    quantizer = SimVQ(dim=8, codebook_size=32, input_to_quantize_commit_loss_weight=0.0)
    x = torch.randn(2, 16, 8, requires_grad=True)
    _, _, loss = quantizer(x)
    loss.backward()
    assert x.grad is None or x.grad.abs().sum() == 0  # no encoder-side term left
    assert quantizer.code_transform.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("rotation_trick", [True, False])
def test_gradient_estimator(rotation_trick: bool) -> None:
    torch.manual_seed(0)
    quantizer = SimVQ(dim=6, codebook_size=16, rotation_trick=rotation_trick)
    x = torch.randn(1, 10, 6, requires_grad=True)
    upstream = torch.randn(1, 10, 6)
    quantized, _, _ = quantizer(x)
    (quantized * upstream).sum().backward()
    if not rotation_trick:
        assert torch.equal(x.grad, upstream)
    else:  # the rotation scales by |q|/|x|: the gradient norm follows the ratio per token
        ratio = quantized.detach().norm(dim=-1) / x.detach().norm(dim=-1)
        expected = upstream.norm(dim=-1) * ratio
        torch.testing.assert_close(x.grad.norm(dim=-1), expected, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_searches_in_float32() -> None:
    torch.manual_seed(0)
    quantizer = SimVQ(dim=16, codebook_size=1024)
    x = torch.randn(4, 128, 16)
    _, reference, _ = quantizer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, indices, loss = quantizer(x)
    assert torch.equal(indices, reference)
    assert quantized.dtype == torch.float32 and torch.isfinite(loss)


def test_init_fn_and_bad_input() -> None:
    quantizer = SimVQ(dim=4, codebook_size=10, init_fn=torch.zeros_like)
    assert torch.equal(quantizer.frozen_codebook, torch.zeros(10, 4))
    with pytest.raises(ValueError, match=r"\(batch, seq, dim\)"):
        quantizer(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match=r"channel_first=True\) expects \(batch, dim=4"):
        SimVQ(dim=4, codebook_size=10, channel_first=True)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="keep the codebook's shape"):
        SimVQ(dim=4, codebook_size=10, init_fn=lambda c: c[:5])
