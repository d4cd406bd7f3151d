"""VectorQuantize(topk=k) with `stochastic_sample_codes` in training draws k codes without
replacement from softmax(-distance / temperature) (Gumbel-top-k), as vector-quantize-pytorch
1.32.0 does: the ordered pair frequencies of ours and of the reference (same codebook, loaded
from its state dict) both match the Plackett-Luce probabilities; eval stays the exact top-k."""

from __future__ import annotations

import itertools

import pytest
import torch

from src.quantizers import VectorQuantize
from src.quantizers.reference_checkpoint import load_reference_state_dict

reference = pytest.importorskip("vector_quantize_pytorch")  # the dev dependency, 1.32.0

DIM, CODES, DRAWS, TEMP = 2, 4, 20000, 0.5


def _pair_frequencies(indices: torch.Tensor) -> dict[tuple[int, int], float]:
    pairs = indices.reshape(-1, 2)
    return {
        (a, b): float(((pairs[:, 0] == a) & (pairs[:, 1] == b)).float().mean())
        for a, b in itertools.permutations(range(CODES), 2)
    }


def _plackett_luce(probs: torch.Tensor) -> dict[tuple[int, int], float]:
    return {
        (a, b): float(probs[a] * probs[b] / (1 - probs[a]))
        for a, b in itertools.permutations(range(CODES), 2)
    }


def test_stochastic_topk_samples_without_replacement_like_the_reference() -> None:
    torch.manual_seed(0)
    theirs = reference.VectorQuantize(
        dim=DIM, codebook_size=CODES, stochastic_sample_codes=True, sample_codebook_temp=TEMP
    )
    ours = VectorQuantize(
        dim=DIM, codebook_size=CODES, stochastic_sample_codes=True, sample_codebook_temp=TEMP
    )
    load_reference_state_dict(ours, theirs.state_dict())
    token = torch.tensor([0.3, -0.2])
    codebook = theirs._codebook.embed[0]
    probs = (-torch.cdist(token[None], codebook)[0] / TEMP).softmax(-1)
    assert float(probs.max()) < 0.6  # a spread distribution: several codes are drawn often
    x = token.expand(1, DRAWS, DIM).clone()
    expected = _plackett_luce(probs)

    for module in (ours, theirs):
        module.train()
        torch.manual_seed(1)
        _, indices, _ = module(x, topk=2)
        assert indices.shape == (1, DRAWS, 2)
        assert bool((indices[..., 0] != indices[..., 1]).all())  # without replacement
        found = _pair_frequencies(indices)
        for pair, p in expected.items():  # 4+ standard errors of a frequency at 20000 draws
            assert abs(found[pair] - p) < 0.015, (type(module).__module__, pair, found[pair], p)
    # topk does not update the codebook in training, in either library
    torch.testing.assert_close(ours.codebook, codebook)

    # eval (and training without stochastic_sample_codes): the exact top-k, equal to theirs
    ours.eval(), theirs.eval()
    y = torch.randn(3, 50, DIM)
    assert torch.equal(ours(y, topk=3)[1], theirs(y, topk=3)[1])
    plain = VectorQuantize(dim=DIM, codebook_size=CODES).train()
    load_reference_state_dict(plain, theirs.state_dict())
    nearest = torch.cdist(y.reshape(-1, DIM), codebook).argsort(-1)[:, :3].reshape(3, 50, 3)
    assert torch.equal(plain(y, topk=3)[1], nearest)
