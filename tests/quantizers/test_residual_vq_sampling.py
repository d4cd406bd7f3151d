"""ResidualVQ with `stochastic_sample_codes`: training draws codes away from the nearest one at
a high temperature, eval always picks the nearest code of each depth's residual (brute force)."""

from __future__ import annotations

import pytest
import torch

from src.quantizers import ResidualVQ

DIM, DEPTHS, CODES = 8, 3, 32


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _sampling_rvq(shared: bool, temperature: float) -> ResidualVQ:
    return ResidualVQ(
        dim=DIM,
        num_quantizers=DEPTHS,
        codebook_size=CODES,
        shared_codebook=shared,
        stochastic_sample_codes=True,
        sample_codebook_temp=temperature,
    )


def _nearest_per_depth(x: torch.Tensor, indices: torch.Tensor, codebooks: torch.Tensor) -> list:
    """For each depth, the brute-force nearest code to the residual the chosen codes leave."""
    residual, nearest = x.reshape(-1, DIM), []
    chosen = indices.reshape(-1, DEPTHS)
    for depth in range(DEPTHS):
        book = codebooks[depth]
        nearest.append((residual[:, None, :] - book[None]).pow(2).sum(-1).argmin(dim=-1))
        residual = residual - book[chosen[:, depth]]
    return nearest


@pytest.mark.parametrize("shared", [False, True])
def test_high_temperature_training_draws_away_from_the_nearest_code(shared: bool) -> None:
    rvq = _sampling_rvq(shared, temperature=100.0)
    rvq.train()
    x = torch.randn(4, 64, DIM)
    codebooks = rvq.codebooks.clone()  # every depth searches before any update is applied
    _, indices, _ = rvq(x)
    nearest = _nearest_per_depth(x, indices, codebooks)
    for depth in range(DEPTHS):
        differs = (indices.reshape(-1, DEPTHS)[:, depth] != nearest[depth]).float().mean()
        # near-uniform draws over 32 codes miss the nearest one about 31 times in 32
        assert differs > 0.8, f"depth {depth}: only {differs:.0%} of draws left the nearest"


@pytest.mark.parametrize("shared", [False, True])
def test_zero_temperature_call_in_training_is_the_nearest_code(shared: bool) -> None:
    """The control: the same call with the temperature overridden to 0 is the argmin."""
    rvq = _sampling_rvq(shared, temperature=100.0)
    rvq.train()
    x = torch.randn(4, 64, DIM)
    codebooks = rvq.codebooks.clone()
    _, indices, _ = rvq(x, sample_codebook_temp=0.0)
    nearest = _nearest_per_depth(x, indices, codebooks)
    for depth in range(DEPTHS):
        assert torch.equal(indices.reshape(-1, DEPTHS)[:, depth], nearest[depth])


@pytest.mark.parametrize("shared", [False, True])
def test_eval_indices_are_the_nearest_codes_whatever_the_temperature(shared: bool) -> None:
    rvq = _sampling_rvq(shared, temperature=100.0)
    rvq(torch.randn(4, 64, DIM))  # a sampled training step moves the codebooks
    rvq.eval()
    x = torch.randn(4, 64, DIM)
    for _ in range(2):  # no randomness left: the same indices every time
        _, indices, _ = rvq(x)
        nearest = _nearest_per_depth(x, indices, rvq.codebooks)
        for depth in range(DEPTHS):
            assert torch.equal(indices.reshape(-1, DEPTHS)[:, depth], nearest[depth])
