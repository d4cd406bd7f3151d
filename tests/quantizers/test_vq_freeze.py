"""`freeze_codebook`, at construction and per call: no k-means init, no EMA, no dead-code
revival, no codebook gradient, while an unfrozen training call does change the state."""

from __future__ import annotations

import pytest
import torch

from src.quantizers import VectorQuantize

ALL_UPDATES = {"kmeans_init": True, "kmeans_iters": 3, "threshold_ema_dead_code": 2.0}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _snapshot(vq: VectorQuantize) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vq.state_dict().items()}


def _unchanged(vq: VectorQuantize, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in vq.state_dict().items())


@pytest.mark.parametrize("kwargs", [{}, {"use_cosine_sim": True}, {"codebook_dim": 4}])
def test_frozen_at_construction_leaves_kmeans_undone_and_state_unchanged(kwargs: dict) -> None:
    vq = VectorQuantize(dim=8, codebook_size=16, freeze_codebook=True, **ALL_UPDATES, **kwargs)
    vq.train()
    before = _snapshot(vq)
    for _ in range(3):
        quantized, _, loss = vq(torch.randn(2, 20, 8))
        assert torch.isfinite(quantized).all() and torch.isfinite(loss).all()
    assert not bool(vq.initted)
    assert (vq.embed == 0).all()  # still the k-means placeholder
    assert _unchanged(vq, before)
    # the constructor's freeze is only a default: an unfrozen call runs k-means
    vq(torch.randn(2, 20, 8), freeze_codebook=False)
    assert bool(vq.initted) and not (vq.embed == 0).all()


@pytest.mark.parametrize("kmeans_init", [False, True])
def test_per_call_freeze_leaves_state_unchanged_and_a_normal_call_changes_it(
    kmeans_init: bool,
) -> None:
    vq = VectorQuantize(
        dim=8, codebook_size=16, kmeans_init=kmeans_init, threshold_ema_dead_code=2.0
    )
    vq.train()
    x = torch.randn(2, 20, 8)
    before = _snapshot(vq)
    frozen = vq(x, freeze_codebook=True)
    assert _unchanged(vq, before)
    assert bool(vq.initted) != kmeans_init
    vq.eval()
    plain_eval = vq(x)  # a frozen training call quantizes exactly as eval does
    vq.train()
    assert torch.equal(frozen.indices, plain_eval.indices)
    torch.testing.assert_close(frozen.quantized, plain_eval.quantized)

    vq(x)
    after = _snapshot(vq)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    expected = {"embed", "cluster_size", "embed_avg"} | ({"initted"} if kmeans_init else set())
    assert set(changed) == expected


def test_per_call_freeze_stops_the_codebook_gradient() -> None:
    vq = VectorQuantize(dim=8, codebook_size=16, learnable_codebook=True, ema_update=False)
    x = torch.randn(2, 20, 8, requires_grad=True)
    quantized, _, loss = vq(x, freeze_codebook=True)
    (quantized.sum() + loss.sum()).backward()
    assert vq.embed.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0
    _, _, loss = vq(x)
    loss.sum().backward()
    assert vq.embed.grad is not None and vq.embed.grad.abs().sum() > 0
