"""ResidualFSQ(refinement="rescaled"), the reference library's residual FSQ (issue 17):
values against a brute-force reimplementation, gradients and quantize dropout against the
installed reference, float32 under autocast, keyword defaults and index checks."""

from __future__ import annotations

import itertools

import pytest
import torch
import vector_quantize_pytorch as reference

from src.quantizers import GroupedResidualFSQ, IndexRangeError, ResidualFSQ


def soft_clamp(x: torch.Tensor, levels: list[int], hard: bool, clamp: float | None):
    """The input clamp: the reference's 1 + 1/(L - 1) per channel with the hard clamp."""
    if hard:
        clamp = 1 + 1 / (torch.tensor(levels).float() - 1)
    return x if clamp is None else (x / clamp).tanh() * clamp


def brute_force(
    x: torch.Tensor, levels: list[int], depth: int, hard: bool, clamp: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, indices (..., depth), per-layer codes (depth, ..., len(levels))) written out:
    soft clamp, then per layer a symmetric FSQ of residual * L**l, its codes / L**l."""
    level_t = torch.tensor(levels).float()
    basis = torch.tensor([1, *torch.tensor(levels).cumprod(0)[:-1].tolist()])
    residual = soft_clamp(x, levels, hard, clamp)
    total, indices, codes = torch.zeros_like(x), [], []
    for layer in range(depth):
        z = residual * level_t**layer
        bounded = z.clamp(-1, 1) if hard else z.tanh()
        digits = ((level_t - 1) * (bounded + 1) / 2 + 0.5).floor()
        layer_codes = (digits * 2 / (level_t - 1) - 1) / level_t**layer
        residual, total = residual - layer_codes, total + layer_codes
        indices.append((digits.long() * basis).sum(-1))
        codes.append(layer_codes)
    return total, torch.stack(indices, -1), torch.stack(codes)


@pytest.mark.parametrize(
    ("levels", "depth", "hard", "clamp"),
    [([8, 5, 5], 3, True, None), ([8, 5, 5, 3], 4, False, None), ([2, 4, 7], 3, False, 1.5)],
)
def test_rescaled_equals_a_brute_force_reimplementation(
    levels: list[int], depth: int, hard: bool, clamp: float | None
) -> None:
    quantizer = ResidualFSQ(
        levels=levels,
        num_quantizers=depth,
        refinement="rescaled",
        bound_hard_clamp=hard,
        soft_clamp_input_value=clamp,
    ).eval()
    x = torch.randn(3, 200, len(levels), generator=torch.Generator().manual_seed(0)) * 2
    out = quantizer(x, return_all_codes=True)
    want, want_indices, want_codes = brute_force(x, levels, depth, hard, clamp)
    torch.testing.assert_close(out.quantized, want, rtol=0, atol=1e-5)
    assert torch.equal(out.indices, want_indices)
    torch.testing.assert_close(out.all_codes, want_codes, rtol=0, atol=1e-6)
    # decoding gives forward's values exactly, with the codes in the reference's units
    assert torch.equal(quantizer.get_output_from_indices(out.indices), out.quantized)
    assert torch.equal(quantizer.decode_indices(out.indices), out.quantized)
    assert torch.equal(quantizer.get_codes_from_indices(out.indices), out.all_codes)
    # the later layers refine: the mean error to the clamped input falls with every layer
    target = soft_clamp(x, levels, hard, clamp)
    errors = [(out.all_codes[:k].sum(0) - target).abs().mean() for k in range(1, depth + 1)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors


def _pair(name: str, **kwargs: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The reference module and ours (refinement='rescaled') holding its state."""
    torch.manual_seed(0)
    ref = getattr(reference, name)(**kwargs)
    with torch.no_grad():
        for parameter in ref.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    mine = globals()[name](refinement="rescaled", **kwargs)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def _grads(module: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor, **call: object):
    x = x.clone().requires_grad_()
    out = module(x, **call)
    (out[0] * upstream).sum().backward()
    weights = [p.grad for _, p in sorted(module.named_parameters())]
    return out, x.grad, weights


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("ResidualFSQ", {"levels": [8, 5, 5], "num_quantizers": 3, "dim": 16}),
        ("ResidualFSQ", {"levels": [8, 5, 5, 3], "num_quantizers": 4, "bound_hard_clamp": False}),
        (
            "ResidualFSQ",
            {
                "levels": [7, 5],
                "num_quantizers": 3,
                "dim": 6,
                "bound_hard_clamp": False,
                "soft_clamp_input_value": 1.2,
            },
        ),
        ("GroupedResidualFSQ", {"levels": [8, 5, 5], "num_quantizers": 2, "dim": 16, "groups": 2}),
    ],
)
def test_gradients_equal_the_references(name: str, kwargs: dict) -> None:
    """Train mode, no dropout: every layer is straight-through in both, so the gradients
    w.r.t. the input and the projections equal the reference's."""
    ref, mine = _pair(name, **kwargs)
    ref.train(), mine.train()
    x = torch.randn(2, 40, kwargs.get("dim", len(kwargs["levels"]))) * 2
    upstream = torch.randn_like(x)
    (want, want_idx, *_), want_x, want_w = _grads(ref, x, upstream)
    (got, got_idx, *_), got_x, got_w = _grads(mine, x, upstream)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(got_idx, want_idx.long())
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=1e-5)
    assert len(got_w) == len(want_w)
    for g, w in zip(got_w, want_w, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    # unlike the exact refinement, the later layers pass gradient too
    single, _ = _pair(name, **{**kwargs, "num_quantizers": 1})
    assert not torch.allclose(_grads(single.train(), x, upstream)[1], got_x)


def test_quantize_dropout_equals_the_references_with_a_fixed_seed() -> None:
    kwargs = {"levels": [8, 5, 5], "num_quantizers": 4, "dim": 16, "quantize_dropout": True}
    ref, mine = _pair("ResidualFSQ", **kwargs, quantize_dropout_cutoff_index=1)
    ref.train(), mine.train()
    x = torch.randn(2, 30, 16)
    upstream = torch.randn_like(x)
    kept = set()
    for seed in range(6):
        call = {"rand_quantize_dropout_fixed_seed": seed, "return_all_codes": True}
        (want, want_idx, want_codes), want_x, _ = _grads(ref, x, upstream, **call)
        (got, got_idx, got_codes), got_x, _ = _grads(mine, x, upstream, **call)
        assert torch.equal(got_idx, want_idx.long())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_codes, want_codes, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_x, want_x, rtol=0, atol=1e-5)
        kept.add(int((got_idx[0, 0] >= 0).sum()))
        # decoding the kept layers (-1 for the dropped) gives the output before project_out
        mine.eval()
        assert torch.equal(mine.get_codes_from_indices(got_idx), got_codes)
        mine.train()
    assert len(kept) > 1 and min(kept) >= 2  # the cutoff layer is always kept


def test_float32_under_autocast_and_float32_codes() -> None:
    quantizer = ResidualFSQ(levels=[8, 5, 5], num_quantizers=3, refinement="rescaled").eval()
    x = torch.randn(2, 64, 3) * 2
    want = quantizer(x, return_all_codes=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = quantizer(x, return_all_codes=True)
    assert got.quantized.dtype == got.all_codes.dtype == torch.float32
    assert torch.equal(got.quantized, want.quantized) and torch.equal(got.indices, want.indices)
    assert torch.equal(got.all_codes, want.all_codes)


def test_keyword_defaults_validation_and_grouped_members() -> None:
    exact = ResidualFSQ(levels=[8, 5, 5], num_quantizers=2)
    rescaled = ResidualFSQ(levels=[8, 5, 5], num_quantizers=2, refinement="rescaled")
    assert exact.refinement == "exact" and exact.bound_hard_clamp is False
    assert rescaled.bound_hard_clamp is True  # the reference's default with its algorithm
    torch.testing.assert_close(rescaled.soft_clamp_input_value, torch.tensor([8 / 7, 1.25, 1.25]))
    soft = ResidualFSQ(
        levels=[8, 5, 5], num_quantizers=2, refinement="rescaled", bound_hard_clamp=False
    )
    assert soft.bound_hard_clamp is False and soft.soft_clamp_input_value is None
    with pytest.raises(ValueError, match=r"'exact'.*'rescaled'.*got 'reference'"):
        ResidualFSQ(levels=[8, 5, 5], num_quantizers=2, refinement="reference")
    with pytest.raises(ValueError, match="drop soft_clamp_input_value"):
        ResidualFSQ(
            levels=[8, 5, 5], num_quantizers=2, refinement="rescaled", soft_clamp_input_value=1.5
        )
    grouped = GroupedResidualFSQ(
        dim=6, groups=2, levels=[8, 5, 5], num_quantizers=2, refinement="rescaled"
    )
    assert all(m.refinement == "rescaled" and m.bound_hard_clamp for m in grouped.rfsqs)
    assert grouped.codebook_size == 200 and grouped.num_codebooks == 4
    assert grouped.codebook_sizes == (200,) * 4


def test_index_range_and_dropped_layers_decode() -> None:
    quantizer = ResidualFSQ(dim=8, levels=[8, 5, 5], num_quantizers=3, refinement="rescaled").eval()
    assert quantizer.codebook_size == 200 and quantizer.codebook_sizes == (200,) * 3
    x = torch.randn(2, 10, 8)
    out = quantizer(x)
    with pytest.raises(IndexRangeError, match=r"index 200"):
        quantizer.decode_indices(out.indices.clamp_max(0) + 200)
    with pytest.raises(IndexRangeError, match=r"index -2"):
        quantizer.get_codes_from_indices(out.indices.clamp_max(0) - 2)
    coarse = out.indices.clone()
    coarse[..., 1:] = -1  # dropped layers contribute nothing
    codes = quantizer.get_codes_from_indices(coarse)
    assert (codes[1:] == 0).all() and torch.equal(
        codes[0], quantizer.get_codes_from_indices(out.indices)[0]
    )
    assert torch.equal(
        quantizer.decode_indices(out.indices[..., :1]), quantizer.decode_indices(coarse)
    )
