"""The reference library's keywords added by issue 17 to FSQ, LFQ and LatentQuantize:
values equal the installed reference (eval mode, same state) where the
algorithms agree, and the behaviour of each keyword checked against a direct computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src.quantizers import FSQ, LFQ, LatentQuantize

FSQ_CASES = {
    "symmetric": {"levels": [8, 5, 5, 5], "preserve_symmetry": True},
    "hard_clamp": {"levels": [8, 5, 5, 5], "bound_hard_clamp": True},
    "symmetric_hard_clamp": {
        "levels": [8, 5, 4],
        "preserve_symmetry": True,
        "bound_hard_clamp": True,
    },
    "two_levels": {"levels": [2, 4, 3], "preserve_symmetry": True, "dim": 8},
    "rotation": {"levels": [5, 5, 5], "dim": 12, "orthogonal_rotation": True, "num_codebooks": 2},
    "scale": {"levels": [8, 6, 5], "scale": 0.5},
}


@pytest.mark.parametrize("case", sorted(FSQ_CASES))
def test_fsq_keywords_equal_the_reference(case: str) -> None:
    reference = pytest.importorskip("vector_quantize_pytorch")
    kwargs = FSQ_CASES[case]
    torch.manual_seed(0)
    theirs = reference.FSQ(**kwargs).eval()
    ours = FSQ(**kwargs).eval()
    ours.load_state_dict(theirs.state_dict())  # the rotation is a persistent buffer in both
    x = torch.randn(2, 300, ours.dim) * 2
    want, got = theirs(x), ours(x)
    torch.testing.assert_close(got.quantized, want[0], atol=1e-5, rtol=0)
    assert torch.equal(got.indices, want[1].long())
    assert torch.equal(ours.decode_indices(got.indices), got.quantized)
    torch.testing.assert_close(theirs.indices_to_codes(want[1]), got.quantized, atol=1e-5, rtol=0)
    assert ours.scale == kwargs.get("scale")


def test_symmetric_levels_by_brute_force_and_straight_through() -> None:
    fsq = FSQ(levels=[4, 3], preserve_symmetry=True).train()
    z = (torch.randn(1000, 2) * 2).requires_grad_()
    out = fsq(z)
    for channel, level in enumerate([4, 3]):
        grid = torch.linspace(-1, 1, level)  # symmetric about 0, both ends reached
        values = out.quantized[:, channel].detach()
        gaps = (values.unsqueeze(-1) - grid).abs()
        assert (gaps.min(-1).values < 1e-6).all() and (gaps.min(0).values < 1e-6).all()
        # the level is floor((L - 1)(tanh(z) + 1)/2 + 1/2): the nearest grid point of tanh(z)
        nearest = (torch.tanh(z[:, channel].detach()).unsqueeze(-1) - grid).abs().argmin(-1)
        assert ((values - grid[nearest]).abs() < 1e-6).all()
    out.quantized.sum().backward()
    expected = (1 - torch.tanh(z.detach()) ** 2) * torch.tensor([3 / 3, 2 / 2])
    torch.testing.assert_close(z.grad, expected)


def test_hard_clamp_bound_is_a_clamp() -> None:
    fsq = FSQ(levels=[5, 4], bound_hard_clamp=True).eval()
    z = torch.tensor([[10.0, -10.0], [0.0, 0.0], [-0.1, 0.1]])
    out = fsq(z)
    # past +-1 the clamp saturates at the outermost levels, not tanh's asymptote
    assert torch.equal(out.quantized[0], torch.tensor([1.0, -1.0]))
    half_l = (torch.tensor([5.0, 4.0]) - 1) * 1.001 / 2
    offset = torch.tensor([0.0, 0.5])
    bounded = (z + offset / half_l).clamp(-1, 1) * half_l - offset
    torch.testing.assert_close(out.quantized, bounded.round() / torch.tensor([2.0, 2.0]))


def test_allowed_dtypes_keep_quantization_in_bfloat16() -> None:
    levels = [8, 5, 5, 5]
    z = torch.randn(2, 64, 4).bfloat16()
    narrow = FSQ(levels, allowed_dtypes=(torch.float32, torch.float64, torch.bfloat16))
    default = FSQ(levels)
    assert default(z).quantized.dtype == narrow(z).quantized.dtype == torch.bfloat16
    # bfloat16 rounding of the bound gives other codes on some elements than float32's
    direct = default._quantize(z.float().unflatten(-1, (1, 4)))[0].flatten(-2).bfloat16()
    assert torch.equal(default(z).quantized, direct)
    bf16 = narrow._quantize(z.unflatten(-1, (1, 4)))[0].flatten(-2)
    assert torch.equal(narrow(z).quantized, bf16)


def test_lfq_batch_mask_equals_the_token_mask_and_the_kept_samples() -> None:
    torch.manual_seed(0)
    lfq = LFQ(codebook_size=256, dim=8, entropy_loss_weight=0.1, commitment_loss_weight=0.2)
    x = torch.randn(3, 8, 4, 4)
    per_sample = torch.tensor([True, False, True])
    got = lfq.train()(x, mask=per_sample, return_loss_breakdown=True)
    tokens = per_sample[:, None, None].expand(3, 4, 4)
    want = lfq(x, mask=tokens, return_loss_breakdown=True)
    kept = lfq(x[per_sample], return_loss_breakdown=True)
    for a, b, c in zip(got[1], want[1], kept[1], strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    assert torch.equal(got[0].quantized, lfq.indices_to_codes(got[0].indices))
    with pytest.raises(ValueError, match=r"\(batch,\), \(batch, seq\)"):
        lfq(x, mask=torch.ones(2, dtype=torch.bool))


def test_latent_quantize_int_levels_need_codebook_dim_as_in_the_reference() -> None:
    reference = pytest.importorskip("vector_quantize_pytorch")
    with pytest.raises(RuntimeError):
        reference.LatentQuantize(levels=5, dim=16)
    with pytest.raises(RuntimeError, match="needs codebook_dim > 0"):
        LatentQuantize(levels=5, dim=16)
    with pytest.raises(ValueError, match="needs codebook_dim > 0"):  # also a ValueError
        LatentQuantize(levels=5, dim=16)
    assert LatentQuantize(levels=5, dim=16, codebook_dim=3).levels == [5, 5, 5]


def test_latent_quantize_in_place_optimizer_takes_one_step_on_the_quantization_loss() -> None:
    torch.manual_seed(0)
    lq = LatentQuantize(
        levels=[5, 3],
        dim=2,
        quantization_loss_weight=0.5,
        commitment_loss_weight=0.25,
        in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    ).train()
    x = torch.randn(1, 64, 2, requires_grad=True)
    before = lq.values.detach().clone()
    # the step by hand: gradient of the weighted quantization loss w.r.t. the values
    values = before.clone().requires_grad_()
    dist = (x.detach().unsqueeze(-1) - values.detach()).abs().masked_fill(lq._padding, torch.inf)
    digits = dist.argmin(-1)
    q = values.reshape(-1)[digits + lq._row_offset]
    (grad,) = torch.autograd.grad(0.5 * F.mse_loss(q, x.detach()), values)
    out = lq(x)
    torch.testing.assert_close(lq.values.detach(), before - 0.1 * grad)
    # the output uses the updated values; the loss is the commitment loss only
    after = lq.eval()(x.detach())
    assert torch.equal(out.quantized.detach(), after.quantized)
    torch.testing.assert_close(out.loss, 0.25 * F.mse_loss(x.detach(), after.quantized))
    out.quantized.sum().backward()
    assert lq.values.grad is None and x.grad is not None
    with pytest.raises(ValueError, match="needs optimize_values=True"):
        LatentQuantize(
            levels=[5, 3], dim=2, optimize_values=False, in_place_codebook_optimizer=torch.optim.SGD
        )


def test_latent_quantize_indices_stay_the_chosen_cells_where_the_reference_breaks() -> None:
    """The reference computes indices from the chosen values through its initial grid
    formula; once the values move, its decode of its own indices no longer gives its output.
    Ours are the chosen cells, so decode equals forward however the values moved."""
    reference = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(1)
    theirs = reference.LatentQuantize(levels=[5, 5, 8], dim=16)
    with torch.no_grad():
        for values in theirs.values_per_latent:
            values.add_(0.05 * torch.randn_like(values))
    ours = LatentQuantize(levels=[5, 5, 8], dim=16)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 16, 4, 4)
    want, got = theirs.eval()(x), ours.eval()(x)
    torch.testing.assert_close(got.quantized, want[0], atol=1e-5, rtol=0)  # same outputs
    assert not torch.equal(theirs.indices_to_codes(want[1]), want[0])  # theirs: broken
    assert torch.equal(ours.decode_indices(got.indices), got.quantized)  # ours: exact
