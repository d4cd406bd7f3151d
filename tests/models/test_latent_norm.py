"""The optional latent normalisation before the quantizer (model.latent_norm=batch)."""

from __future__ import annotations

import copy

import pytest
import torch

from src.models.image_tokenizer import ImageTokenizer
from src.models.latent_norm import ScaledBatchNorm, build_latent_norm
from tests.quantizers.test_entropy import ThreadRanks


def test_batch_norm_pins_each_channel_at_the_scale_in_training() -> None:
    torch.manual_seed(0)
    norm = build_latent_norm("batch", channels=3, scale=1.5).train()
    shifts = torch.tensor([2.0, -1.0, 0.0]).view(1, 3, 1, 1)
    widths = torch.tensor([0.1, 3.0, 0.5]).view(1, 3, 1, 1)
    out = norm(torch.randn(16, 3, 7, 7) * widths + shifts)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    std = out.transpose(0, 1).reshape(3, -1).std(dim=1, unbiased=False)
    torch.testing.assert_close(std, torch.full((3,), 1.5), atol=1e-3, rtol=0)


def test_eval_uses_running_statistics_of_training_batches() -> None:
    torch.manual_seed(0)
    norm = build_latent_norm("batch", channels=2, scale=2.0)
    shifts, widths = torch.tensor([3.0, -2.0]).view(1, 2, 1), torch.tensor([0.5, 4.0]).view(1, 2, 1)
    for _ in range(200):
        norm(torch.randn(32, 2, 20) * widths + shifts)
    norm.eval()
    one = torch.randn(1, 2, 4000) * widths + shifts  # a single sample: no batch statistics
    out = norm(one)
    torch.testing.assert_close(out.mean(dim=(0, 2)), torch.zeros(2), atol=0.1, rtol=0)
    torch.testing.assert_close(out.std(dim=(0, 2)), torch.full((2,), 2.0), atol=0.1, rtol=0)


def test_none_is_identity_and_bad_settings_name_the_fix() -> None:
    x = torch.randn(2, 3, 4)
    assert torch.equal(build_latent_norm(None, 3)(x), x)
    with pytest.raises(ValueError, match=r"latent_norm must be null or one of \['batch'\]"):
        build_latent_norm("layer", 3)
    with pytest.raises(ValueError, match="latent_scale must be positive"):
        build_latent_norm("batch", 3, scale=0.0)


def test_tokenizer_feeds_the_quantizer_normalised_latents() -> None:
    torch.manual_seed(0)
    model = ImageTokenizer(
        in_channels=1,
        quantizer={"name": "fsq", "levels": [8, 8, 8]},
        channels=(16, 32),
        latent_dim=3,
        latent_norm="batch",
        latent_scale=1.5,
    ).train()
    seen = []
    model.quantizer.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    model(torch.rand(8, 1, 16, 16))
    tokens = seen[0].reshape(-1, 3)  # (batch, tokens, channels) as the adapter passes them
    torch.testing.assert_close(
        tokens.std(dim=0, unbiased=False), torch.full((3,), 1.5), atol=1e-3, rtol=0
    )
    assert "latent_norm.running_var" in model.state_dict()


def test_matches_torch_batch_norm_values_gradients_and_running_statistics() -> None:
    torch.manual_seed(0)
    ours = ScaledBatchNorm(4, scale=1.0)
    reference = torch.nn.BatchNorm1d(4, affine=False)
    x = (torch.randn(6, 4, 9) * 3 + 5).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    weights = torch.randn(6, 4, 9)
    for _ in range(3):
        (ours(x) * weights).sum().backward()
        (reference(x_ref) * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    torch.testing.assert_close(ours.eval()(x), reference.eval()(x_ref), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_keeps_float32_statistics() -> None:
    norm = ScaledBatchNorm(3, scale=1.0)
    x = torch.randn(4, 3, 10, dtype=torch.bfloat16) * 2 + 100  # a large mean in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16 and norm.running_mean.dtype == torch.float32
    expected = torch.nn.functional.batch_norm(x.float(), None, None, training=True)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_two_ranks_normalise_with_the_statistics_of_their_union() -> None:
    """Thread 'ranks' see the union's statistics, its gradients (summed over ranks) and its
    running estimates, as one process on the concatenated batch."""
    torch.manual_seed(0)
    shards = [torch.randn(3, 2, 8) * 2 + 1, torch.randn(5, 2, 8) - 3]  # uneven, distinct
    weights = [torch.randn(3, 2, 8), torch.randn(5, 2, 8)]
    base = ScaledBatchNorm(2, scale=1.5)
    comm = ThreadRanks()
    results: dict[int, tuple[torch.Tensor, torch.Tensor, ScaledBatchNorm]] = {}

    def run(rank: int) -> None:
        norm = copy.deepcopy(base)
        norm.set_communicator(comm)
        x = shards[rank].clone().requires_grad_()
        out = norm(x)
        (out * weights[rank]).sum().backward()
        results[rank] = (out.detach(), x.grad, norm)

    comm.run_each(run)
    union_x = torch.cat(shards).requires_grad_()
    union = copy.deepcopy(base)
    union_out = union(union_x)
    (union_out * torch.cat(weights)).sum().backward()
    for rank, rows in ((0, slice(0, 3)), (1, slice(3, 8))):
        out, grad, norm = results[rank]
        torch.testing.assert_close(out, union_out.detach()[rows])
        torch.testing.assert_close(grad, union_x.grad[rows], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.running_mean, union.running_mean)
        torch.testing.assert_close(norm.running_var, union.running_var)
