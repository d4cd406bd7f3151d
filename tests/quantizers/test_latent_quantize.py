"""LatentQuantize: the guide's examples, nearest values, exact indices after training, losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src.quantizers import LatentQuantize, LatentQuantizeOutput, build_quantizer


def test_guide_example_image_map() -> None:
    quantizer = LatentQuantize(
        levels=[5, 5, 8],
        dim=16,
        commitment_loss_weight=0.1,
        quantization_loss_weight=0.1,
    )
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, loss = quantizer(image_feats)
    assert quantized.shape == (1, 16, 32, 32)
    assert indices.shape == (1, 32, 32)
    assert loss.shape == ()
    assert image_feats.shape == quantized.shape
    assert (quantized == quantizer.indices_to_codes(indices)).all()


def test_guide_example_sequence_and_video() -> None:
    quantizer = LatentQuantize(
        levels=[5, 5, 8],
        dim=16,
        commitment_loss_weight=0.1,
        quantization_loss_weight=0.1,
    )
    seq = torch.randn(1, 32, 16)
    quantized, *_ = quantizer(seq)
    assert quantized.shape == (1, 32, 16)
    video_feats = torch.randn(1, 16, 10, 32, 32)
    quantized, indices, _ = quantizer(video_feats)
    assert quantized.shape == (1, 16, 10, 32, 32)
    assert torch.equal(quantizer.indices_to_codes(indices), quantized)


def test_guide_example_multiple_codebooks() -> None:
    # The guide's example uses `dim` and `num_codebooks` without defining them; its evident
    # intent (the constructor's values, and the printed shapes) is dim = 9, num_codebooks = 3.
    dim, num_codebooks = 9, 3
    model = LatentQuantize(levels=[4, 8, 16], dim=9, num_codebooks=3)
    input_tensor = torch.randn(2, 3, dim)
    output_tensor, indices, loss = model(input_tensor)
    assert output_tensor.shape == (2, 3, 9)
    assert indices.shape == (2, 3, 3)
    assert loss.shape == ()
    assert output_tensor.shape == input_tensor.shape
    assert indices.shape == (2, 3, num_codebooks)
    assert loss.item() >= 0
    assert torch.equal(model.indices_to_codes(indices), output_tensor)


def test_registered_fields_and_attributes() -> None:
    quantizer = build_quantizer("latent_quantize", levels=[8, 6, 5], dim=32)
    assert isinstance(quantizer, LatentQuantize)
    assert quantizer.codebook_size == 240 and quantizer.num_codebooks == 1
    out = quantizer(torch.randn(2, 7, 32))
    assert isinstance(out, LatentQuantizeOutput)
    assert out._fields == ("quantized", "indices", "loss")


def _train_values(quantizer: LatentQuantize, steps: int = 20) -> None:
    optimizer = torch.optim.SGD(quantizer.parameters(), lr=0.5)
    for _ in range(steps):
        x = torch.randn(4, 64, quantizer.dim) * 0.7 + 0.3
        _, _, loss = quantizer(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_indices_exact_after_values_are_trained() -> None:
    torch.manual_seed(0)
    quantizer = LatentQuantize(levels=[5, 3, 8], dim=3, quantization_loss_weight=1.0)
    before = quantizer.values.detach().clone()
    _train_values(quantizer)
    assert not torch.allclose(quantizer.values, before, atol=1e-3)
    x = torch.randn(3, 50, 3)
    quantized, indices, _ = quantizer(x)
    assert torch.equal(quantizer.indices_to_codes(indices), quantized)
    # every code, decoded and quantized again, returns its own index
    every = torch.arange(quantizer.codebook_size).reshape(1, -1)
    codes = quantizer.indices_to_codes(every)
    requantized, again, _ = quantizer(codes)
    assert torch.equal(again, every)
    assert torch.equal(requantized, codes)


def test_indices_exact_after_training_with_projection_and_codebooks() -> None:
    torch.manual_seed(1)
    quantizer = LatentQuantize(levels=[4, 6], dim=10, num_codebooks=2)
    _train_values(quantizer, steps=5)
    x = torch.randn(2, 10, 6, 6)
    quantized, indices, _ = quantizer(x)
    assert indices.shape == (2, 6, 6, 2)
    assert torch.equal(quantizer.indices_to_codes(indices), quantized)


def test_nearest_value_per_dimension_and_mixed_radix_index() -> None:
    torch.manual_seed(0)
    levels = [3, 5, 4]
    quantizer = LatentQuantize(levels=levels, dim=3)
    with torch.no_grad():  # arbitrary, unsorted values, padding slots included
        quantizer.values.copy_(torch.randn_like(quantizer.values))
    z = torch.randn(2, 200, 3) * 1.5
    quantized, indices, _ = quantizer(z)
    expected_index = torch.zeros(2, 200, dtype=torch.long)
    radix = 1
    for d, level in enumerate(levels):
        values = quantizer.values[d, :level].detach()
        digit = (z[..., d].unsqueeze(-1) - values).abs().argmin(-1)
        assert torch.equal(quantized[..., d], values[digit])
        expected_index += digit * radix
        radix *= level
    assert torch.equal(indices, expected_index)


def test_losses_and_gradients() -> None:
    quantizer = LatentQuantize(
        levels=[5, 5], dim=2, commitment_loss_weight=0.2, quantization_loss_weight=0.7
    )
    x = torch.randn(3, 40, 2, requires_grad=True)
    quantized, _, loss = quantizer(x)
    mse = F.mse_loss(quantized, x).item()
    assert loss.item() == pytest.approx((0.2 + 0.7) * mse, rel=1e-5)
    loss.backward()
    assert quantizer.values.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    # the output's straight-through gradient is the identity and never reaches the values
    quantizer.values.grad = None
    x.grad = None
    quantized, _, _ = quantizer(x)
    quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert quantizer.values.grad is None or quantizer.values.grad.abs().sum() == 0


def test_int_levels_and_fixed_values() -> None:
    quantizer = LatentQuantize(levels=5, dim=4, codebook_dim=4, optimize_values=False)
    assert quantizer.levels == [5, 5, 5, 5]
    assert quantizer.codebook_size == 5**4
    assert list(quantizer.parameters()) == []
    # an int `levels` without codebook_dim is refused, as the reference does (issue 17)
    with pytest.raises(RuntimeError, match="needs codebook_dim > 0"):
        LatentQuantize(levels=3, dim=6, num_codebooks=2)
    every = torch.arange(math.prod([5] * 4)).reshape(1, -1)
    codes = quantizer.indices_to_codes(every)
    assert torch.equal(quantizer(codes).indices, every)


def test_bad_input_names_expected_layout() -> None:
    quantizer = LatentQuantize(levels=[5, 5, 8], dim=16)
    with pytest.raises(ValueError, match=r"sequence \(batch, seq, dim=16\)"):
        quantizer(torch.randn(1, 15, 32))
    # (batch, dim, seq): the reference's layout, decoded back in it
    series = torch.randn(1, 16, 32)
    out = quantizer(series)
    assert out.quantized.shape == series.shape and out.indices.shape == (1, 32)
    assert torch.equal(quantizer.decode_indices(out.indices), out.quantized)
    assert quantizer.decode_indices(quantizer(series.transpose(1, 2)).indices).shape == (1, 32, 16)
    with pytest.raises(ValueError, match=r"channel-first"):
        quantizer(torch.randn(16, 32))
    with pytest.raises(ValueError, match="levels"):
        LatentQuantize(levels=[1, 4], dim=2)


def test_input_keyword_is_the_references_z() -> None:
    """`lq(z=...)` as the reference's forward(z) is called; equal to the positional call."""
    torch.manual_seed(0)
    quantizer = LatentQuantize(levels=[5, 5, 8], dim=16).eval()
    feats = torch.randn(2, 16, 4, 4)
    by_name, positional = quantizer(z=feats), quantizer(feats)
    assert torch.equal(by_name.quantized, positional.quantized)
    assert torch.equal(by_name.indices, positional.indices)
    assert torch.equal(by_name.quantized, quantizer.indices_to_codes(by_name.indices))
