"""FSP (finite scalar perturbation): values equal the reference library's in eval mode, bins
and indices by brute force, float32 statistics under autocast, non-finite tokens excluded."""

from __future__ import annotations

import pytest
import torch

from src.quantizers import FSP, aux_loss
from src.quantizers.fsp import CDF_ACTIVATIONS, batch_moments, build_cdf_act

CASES = [
    {"levels": [8, 5, 5, 5]},
    {"levels": [8, 5, 5, 5], "dim": 16},
    {
        "levels": [7, 5, 3],
        "dim": 6,
        "act_name": "normal",
        "need_inv_act": True,
        "vector_norm": "kurt",
    },
    {"levels": [4, 4], "dim": 4, "channel_first": True, "act_name": "cauchy"},
    {"levels": [3, 6], "act_name": "laplace", "vector_norm": "var_laplace"},
    {"levels": [5, 5], "act_name": "sigmoid", "need_inv_act": True, "vector_norm": "none"},
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_eval_outputs_equal_the_reference(case: int) -> None:
    reference = pytest.importorskip("vector_quantize_pytorch")
    kwargs = CASES[case]
    torch.manual_seed(case)
    theirs = reference.FSP(**kwargs).eval()
    ours = FSP(**kwargs).eval()
    ours.load_state_dict(theirs.state_dict())
    dim = kwargs.get("dim", len(kwargs["levels"]))
    x = torch.randn(2, dim, 5, 3) * 2 if kwargs.get("channel_first") else torch.randn(2, 50, dim)
    x = x * 2
    want, got = theirs(x), ours(x)
    torch.testing.assert_close(got.quantized, want[0], atol=1e-5, rtol=0)
    assert torch.equal(got.indices, want[1]) and got.indices.dtype == torch.int32
    torch.testing.assert_close(got.norm_loss, want[2].float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        ours.indices_to_codes(got.indices), theirs.indices_to_codes(want[1]), atol=1e-5, rtol=0
    )


def test_bins_and_indices_by_brute_force() -> None:
    fsp = FSP(levels=[4, 3], act_name="tanh").eval()
    z = torch.randn(500, 2) * 3
    out = fsp(z)
    act = (torch.tanh(z) + 1) / 2
    for channel, level in enumerate([4, 3]):
        # the bin is the one whose interval [k/L, (k+1)/L) holds the activation
        expected = torch.stack([(act[:, channel] >= k / level).long() for k in range(1, level)])
        bins = out.info["level_indices"][:, channel].long()
        assert torch.equal(bins, expected.sum(0))
    bins = out.info["level_indices"].long()
    assert torch.equal(out.indices.long(), bins[:, 0] + 4 * bins[:, 1])
    midpoints = (bins.float() + 0.5) / torch.tensor([4.0, 3.0])
    torch.testing.assert_close(out.quantized, (midpoints - 0.5) * 12**0.5)
    assert torch.equal(fsp.indices_to_level_indices(out.indices).long(), bins)
    assert torch.equal(fsp.decode_indices(out.indices), out.quantized)


@pytest.mark.parametrize("name", sorted(CDF_ACTIVATIONS))
def test_cdf_activation_inverts(name: str) -> None:
    act, inverse = build_cdf_act(name)
    x = torch.randn(64, 10)
    y = act(x)
    assert ((y > 0) & (y < 1)).all()
    torch.testing.assert_close(inverse(y), x, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="unknown CDF activation 'relu'"):
        build_cdf_act("relu")


def test_training_perturbs_within_half_a_bin_and_quantize_rate_one_rounds() -> None:
    torch.manual_seed(0)
    fsp = FSP(levels=[8, 5], quantize_rate=0.0).train()
    z = torch.randn(4000, 2)
    out = fsp(z)
    act = (torch.tanh(z) + 1) / 2
    value = out.quantized / 12**0.5 + 0.5  # back to (0, 1)
    half_bin = 1 / (2 * torch.tensor([8.0, 5.0]))
    assert ((value - act).abs() <= half_bin + 1e-6).all()
    assert (value - act).abs().max() > 0.5 * half_bin.min()  # it does perturb
    assert 0.9 < out.info["p_accept_prob"] <= 1.0
    rounding = FSP(levels=[8, 5], quantize_rate=1.0).train()
    assert torch.equal(rounding(z).quantized, rounding.eval()(z).quantized)


def test_gradients_reach_the_input_and_projections() -> None:
    fsp = FSP(levels=[8, 5, 5, 5], dim=12).train()
    x = torch.randn(2, 30, 12, requires_grad=True)
    out = fsp(x)
    (out.quantized.square().sum() + out.norm_loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, parameter in fsp.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_moment_loss_is_float32_under_autocast_and_keeps_the_output_dtype() -> None:
    fsp = FSP(levels=[8, 5, 5, 5], dim=16).train()
    x = torch.randn(2, 64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fsp(x)
    assert out.norm_loss.dtype == torch.float32
    assert out.quantized.dtype == torch.bfloat16
    assert aux_loss(out).dtype == torch.float32 and aux_loss(out) == out.norm_loss
    moments = out.info["norm_info"]
    assert all(v.dtype == torch.float32 for v in moments.values())


def test_masked_moments_equal_the_moments_of_the_kept_rows() -> None:
    z = torch.randn(40, 3)
    valid = torch.rand(40) > 0.3
    for masked, direct in zip(batch_moments(z, valid), batch_moments(z[valid]), strict=True):
        torch.testing.assert_close(masked, direct)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_token_gets_minus_one_and_no_part_in_the_loss(value: float) -> None:
    fsp = FSP(levels=[8, 5, 5, 5], dim=8).train()
    x = torch.randn(2, 10, 8)
    bad = x.clone()
    bad[0, 3, 1] = value
    out = fsp(bad)
    assert (
        out.indices[0, 3] == -1 and (out.indices.flatten()[out.indices.flatten() != -1] >= 0).all()
    )
    assert torch.isfinite(out.norm_loss)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, 3] = False
    latents = fsp.project_in(x)[keep]
    expected, _ = fsp.vector_norm(latents)
    torch.testing.assert_close(out.norm_loss, expected)
    decoded = fsp.eval().decode_indices(fsp(bad).indices)
    assert torch.equal(decoded[0, 3], torch.zeros(8))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="quantize_rate"):
        FSP(levels=[4, 4], quantize_rate=1.5)
    with pytest.raises(ValueError, match="vector_norm preset 'nope'"):
        FSP(levels=[4, 4], vector_norm="nope")
    with pytest.raises(ValueError, match=r"\(\.\.\., dim=4\)"):
        FSP(levels=[4, 4], dim=4)(torch.randn(2, 3, 5))
