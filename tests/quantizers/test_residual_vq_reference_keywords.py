"""ResidualVQ's newer reference keywords (issue 17): beam search, quant_grad_frac, DiVeQ,
seeded quantize dropout, cross-entropy against given codes, masked padding, heads."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from src.quantizers import GroupedResidualVQ, ResidualLFQ, ResidualSimVQ, ResidualVQ

DIM = 8


def _paths_brute_force(rvq: ResidualVQ, x: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """(N, Q) the code path of each row minimising sum_i w_i * mean((r_i - c_i)^2), found by
    trying every path."""
    books = rvq.codebooks  # (Q, K, d)
    q, k, _ = books.shape
    best_score = torch.full((x.shape[0],), float("inf"))
    best = torch.zeros(x.shape[0], q, dtype=torch.long)
    for path in itertools.product(range(k), repeat=q):
        residual, score = x.clone(), torch.zeros(x.shape[0])
        for depth, code in enumerate(path):
            step = books[depth, code]
            score = score + weights[depth] * (residual - step).pow(2).mean(-1)
            residual = residual - step
        better = score < best_score
        best_score = torch.where(better, score, best_score)
        best[better] = torch.tensor(path)
    return best


@pytest.mark.parametrize("weights", [None, [0.0, 0.5, 2.0]])
def test_exhaustive_beam_finds_the_best_scoring_code_path(weights: list[float] | None) -> None:
    torch.manual_seed(0)
    rvq = ResidualVQ(
        dim=DIM,
        num_quantizers=3,
        codebook_size=4,
        beam_size=16,
        beam_score_quantizer_weights=weights,
    ).eval()
    x = torch.randn(1, 40, DIM)
    quantized, indices, _ = rvq(x)
    expected = _paths_brute_force(rvq, x[0], weights or [1.0] * 3)
    assert torch.equal(indices[0], expected)
    torch.testing.assert_close(quantized, rvq.get_output_from_indices(indices))


def test_beam_of_one_is_greedy_and_eval_uses_eval_beam_size() -> None:
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=16, beam_size=2, eval_beam_size=5)
    rvq.eval()
    x = torch.randn(2, 30, DIM)
    greedy = rvq(x, beam_size=1)
    plain = ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=16)
    plain.load_state_dict(rvq.state_dict())
    expected = plain.eval()(x)
    assert torch.equal(greedy.indices, expected.indices)
    torch.testing.assert_close(greedy.quantized, expected.quantized)
    assert torch.equal(rvq(x).indices, rvq(x, beam_size=5).indices)

    # a wider beam never scores worse (the score is the summed per-depth commitment loss)
    def score(indices: torch.Tensor) -> torch.Tensor:
        codes = rvq.get_codes_from_indices(indices)  # (Q, b, n, d)
        residual, total = x.clone(), torch.zeros(())
        for depth in range(3):
            total = total + (residual - codes[depth]).pow(2).mean(-1)
            residual = residual - codes[depth]
        return total

    assert bool((score(rvq(x).indices) <= score(greedy.indices) + 1e-5).all())


def test_beam_training_updates_each_depth_along_the_chosen_path() -> None:
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=8, beam_size=3, decay=0.5)
    x = torch.randn(1, 50, DIM, requires_grad=True)
    sizes = [layer.cluster_size.clone() for layer in rvq.layers]
    sums = [layer.embed_avg.clone() for layer in rvq.layers]
    books = rvq.codebooks.clone()
    mask = torch.rand(1, 50) > 0.2
    quantized, indices, loss = rvq.train()(x, mask=mask)
    assert loss.shape == (2,) and bool((indices[~mask] == -1).all())
    residual = x.detach()[mask]  # what depth 0 saw; depth 1 saw it minus depth 0's code
    for depth, layer in enumerate(rvq.layers):
        chosen = indices[mask][:, depth]
        counts = torch.bincount(chosen, minlength=8).float()
        torch.testing.assert_close(layer.cluster_size, 0.5 * sizes[depth] + 0.5 * counts)
        summed = torch.zeros(8, DIM).index_add_(0, chosen, residual)
        torch.testing.assert_close(layer.embed_avg, 0.5 * sums[depth] + 0.5 * summed)
        residual = residual - books[depth][chosen]
    quantized.sum().backward()
    assert x.grad[mask].abs().sum() > 0
    frozen = [layer.embed.clone() for layer in rvq.layers]
    rvq(x, freeze_codebook=True)
    assert all(torch.equal(a, layer.embed) for a, layer in zip(frozen, rvq.layers, strict=True))


def test_beam_with_quantize_dropout_and_shared_codebook() -> None:
    torch.manual_seed(0)
    rvq = ResidualVQ(
        dim=DIM,
        num_quantizers=4,
        codebook_size=8,
        beam_size=2,
        quantize_dropout=True,
        shared_codebook=True,
    ).train()
    x = torch.randn(1, 20, DIM)
    for seed in range(4):
        kept = random.Random(seed).randrange(0, 4) + 1
        _, indices, loss = rvq(x, rand_quantize_dropout_fixed_seed=seed)
        assert bool((indices[..., kept:] == -1).all()) and bool((indices[..., :kept] >= 0).all())
        assert bool((loss[..., kept:] == 0).all())


def test_quant_grad_frac_keeps_values_and_lets_gradient_through_the_residual() -> None:
    torch.manual_seed(0)
    base = ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=8, rotation_trick=False)
    frac = ResidualVQ(
        dim=DIM, num_quantizers=2, codebook_size=8, rotation_trick=False, quant_grad_frac=0.25
    )
    frac.load_state_dict(base.state_dict())
    x = torch.randn(1, 10, DIM)
    grads = []
    for rvq in (base, frac):
        xi = x.clone().requires_grad_()
        out, _, _ = rvq.eval()(xi)
        out.sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(base.eval()(x).quantized, frac.eval()(x).quantized)
    # straight-through depths: d(out)/dx = 1 + (1 - frac), as depth 1's input is x - frac·q0
    # (with its gradient) - (1 - frac)·q0 (without)
    torch.testing.assert_close(grads[0], torch.full_like(x, 2.0))
    torch.testing.assert_close(grads[1], torch.full_like(x, 1.75))


def test_cross_entropy_against_given_codes_is_the_sum_over_depths() -> None:
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=8).eval()
    x = torch.randn(1, 12, DIM)
    _, codes, _ = rvq(x)
    target = torch.randint(0, 8, codes.shape)
    _, ce = rvq(x, indices=target)
    residual, expected = x[0], 0.0
    for depth in range(2):
        book = rvq.codebooks[depth]
        expected = expected + F.cross_entropy(-torch.cdist(residual, book), target[0, :, depth])
        residual = residual - book[torch.cdist(residual, book).argmin(-1)]
    torch.testing.assert_close(ce, expected)
    with pytest.raises(ValueError, match="eval-mode"):
        rvq(x, indices=torch.full_like(target, -1))


def test_masked_padding_passthrough_diveq_and_refused_keywords() -> None:
    torch.manual_seed(0)
    rvq = ResidualVQ(
        dim=DIM, num_quantizers=2, codebook_size=8, return_zeros_for_masked_padding=False
    ).eval()
    x = torch.randn(1, 6, DIM)
    mask = torch.tensor([[True, True, True, False, False, False]])
    out, indices, _ = rvq(x, mask=mask)
    assert torch.equal(out[0, 3:], x[0, 3:]) and bool((indices[0, 3:] == -1).all())

    diveq = ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=8, diveq=True)
    assert not diveq.layers[0].ema_update and diveq.layers[0].learnable_codebook
    x = torch.randn(1, 30, DIM, requires_grad=True)
    out, indices, loss = diveq.train()(x)
    assert bool((loss == 0).all())
    out.square().sum().backward()
    assert all(layer.embed.grad.abs().sum() > 0 for layer in diveq.layers)
    diveq.eval()
    out, indices, _ = diveq(x)
    torch.testing.assert_close(out, diveq.get_output_from_indices(indices))

    with pytest.raises(ValueError, match="heads=1"):
        ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=8, heads=2)
    with pytest.raises(ValueError, match="eval_beam_size needs beam_size"):
        ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=8, eval_beam_size=2)
    # implicit_neural_codebook (QINCo) is implemented: tests/quantizers/test_residual_vq_implicit.py


def test_other_residual_families_take_the_seed_and_all_codes() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 12, DIM)
    for family in (ResidualSimVQ, ResidualLFQ):
        kwargs = {"dim": DIM, "num_quantizers": 4, "quantize_dropout": True}
        module = family(codebook_size=16, **kwargs).train()
        for seed in range(3):
            kept = random.Random(seed).randrange(0, 4) + 1
            out = module(x, rand_quantize_dropout_fixed_seed=seed)
            assert bool((out.indices[..., kept:] == -1).all()), family.__name__
            assert bool((out.indices[..., :kept] >= 0).all()), family.__name__
    sim = ResidualSimVQ(dim=DIM, num_quantizers=3, codebook_size=16).eval()
    quantized, _, _, all_codes = sim(x, return_all_codes=True)
    assert all_codes.shape == (3, 1, 12, DIM)
    torch.testing.assert_close(all_codes.sum(0), quantized, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="heads=1"):
        ResidualSimVQ(dim=DIM, num_quantizers=2, codebook_size=8, heads=2)


def test_grouped_cross_entropy_is_the_sum_over_groups() -> None:
    torch.manual_seed(0)
    grouped = GroupedResidualVQ(dim=2 * DIM, groups=2, num_quantizers=2, codebook_size=8).eval()
    x = torch.randn(1, 12, 2 * DIM)
    _, codes, _ = grouped(x)
    quantized, ce = grouped(x, indices=codes)
    expected = sum(
        rvq(chunk, indices=group_codes)[1]
        for rvq, chunk, group_codes in zip(grouped.rvqs, x.chunk(2, dim=-1), codes, strict=True)
    )
    torch.testing.assert_close(ce, expected)
    torch.testing.assert_close(quantized, grouped(x).quantized)
