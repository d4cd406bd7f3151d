"""Non-finite tokens (NaN, inf) never enter codebook statistics, and get index -1.

One bad token in a training batch used to make the EMA codebooks non-finite for good (later
clean batches decoded to NaN while their indices looked valid), and FSQ turned NaN into index
INT64_MIN. The exclusion is a mask (no host sync), so it costs nothing on clean batches.
"""

from __future__ import annotations

import copy

import pytest
import torch

from src.quantizers import FSQ, LFQ, ResidualVQ, VectorQuantize

BAD = [float("nan"), float("inf"), float("-inf")]


def _poisoned(batch: torch.Tensor, value: float) -> torch.Tensor:
    bad = batch.clone()
    bad[0, 3, 1] = value
    return bad


def _vq_variants() -> list[tuple[str, torch.nn.Module]]:
    common = {"dim": 8, "codebook_size": 16}
    return [
        ("ema", VectorQuantize(**common, decay=0.5)),
        ("ema dead codes", VectorQuantize(**common, decay=0.5, threshold_ema_dead_code=2.0)),
        ("kmeans", VectorQuantize(**common, kmeans_init=True, kmeans_iters=3)),
        (
            "cosine dead codes",
            VectorQuantize(**common, use_cosine_sim=True, threshold_ema_dead_code=2),
        ),
        (
            "heads",
            VectorQuantize(**common, heads=2, separate_codebook_per_head=True, codebook_dim=3),
        ),
        ("rvq", ResidualVQ(**common, num_quantizers=3, threshold_ema_dead_code=2.0)),
        (
            "rvq shared kmeans",
            ResidualVQ(**common, num_quantizers=2, shared_codebook=True, kmeans_init=True),
        ),
    ]


VQ_NAMES = [name for name, _ in _vq_variants()]
# dead-code revival draws from a pool of a different size when a mask drops a token than when a
# bad token stays in place (a code that draws it stays dead until the next step): there the
# state must be finite, not equal
REVIVES = {"ema dead codes", "cosine dead codes", "rvq"}


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("name", VQ_NAMES)
def test_vq_state_stays_finite_and_equals_training_without_the_bad_token(
    name: str, value: float
) -> None:
    """A batch with one bad token updates the codebooks as the batch with that token masked."""
    torch.manual_seed(0)
    poisoned = dict(_vq_variants())[name].train()
    masked = dict(_vq_variants())[name].train()
    masked.load_state_dict(poisoned.state_dict())
    batch = torch.randn(2, 10, 8)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 3] = False

    torch.manual_seed(1)
    out = poisoned(_poisoned(batch, value))
    torch.manual_seed(1)
    ref = masked(batch, mask=mask)
    for key, tensor in _state(poisoned).items():
        assert torch.isfinite(tensor).all(), f"{name}: {key} is no longer finite"
        if name not in REVIVES:
            torch.testing.assert_close(tensor, _state(masked)[key], msg=f"{name}: {key}")
    # the bad token's codes are -1 (no code), the others equal the masked run's
    assert (out.indices[0, 3] == -1).all()
    keep = mask.unsqueeze(-1) if out.indices.ndim == 3 else mask
    torch.testing.assert_close(out.indices.masked_fill(~keep, -1), ref.indices)

    # later clean batches decode to finite values, with in-range indices
    for _ in range(3):
        clean = poisoned(torch.randn(2, 10, 8))
        assert torch.isfinite(clean.quantized).all()
        assert ((clean.indices >= 0) & (clean.indices < 16)).all()


def test_vq_exclusion_compiles_without_graph_break() -> None:
    """The exclusion is masking, not filtering: EMA VQ with dead-code revival compiles as one
    graph on a batch with a NaN token (a host sync would break it) and updates its state as
    the eager module does."""
    vq = VectorQuantize(dim=8, codebook_size=16, decay=0.5, threshold_ema_dead_code=2.0)
    twin = copy.deepcopy(vq)
    x = _poisoned(torch.randn(2, 10, 8), float("nan"))
    compiled = torch.compile(vq, backend="aot_eager", fullgraph=True)
    torch.manual_seed(5)
    got = compiled(x)
    torch.manual_seed(5)
    ref = twin(x)
    assert torch.equal(got.indices, ref.indices) and got.indices[0, 3] == -1
    for key, tensor in _state(vq).items():
        assert torch.isfinite(tensor).all(), key
        torch.testing.assert_close(tensor, _state(twin)[key])


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("training", [True, False])
def test_fsq_index_of_a_non_finite_token_is_minus_one(value: float, training: bool) -> None:
    fsq = FSQ(levels=[8, 5, 5, 5], dim=8, num_codebooks=2).train(training)
    batch = torch.randn(2, 10, 8)
    out = fsq(_poisoned(batch, value))  # channel 1: the first codebook's group
    assert out.indices[0, 3, 0] == -1
    clean = fsq(batch).indices
    other = torch.ones_like(clean, dtype=torch.bool)
    other[0, 3, 0] = False
    assert torch.equal(out.indices[other], clean[other])
    assert ((clean >= 0) & (clean < fsq.codebook_size)).all()


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("training", [True, False])
def test_lfq_index_of_a_non_finite_token_is_minus_one(value: float, training: bool) -> None:
    lfq = LFQ(dim=8, codebook_size=256).train(training)
    batch = torch.randn(2, 10, 8)
    out = lfq(_poisoned(batch, value))
    assert out.indices[0, 3] == -1
    clean = lfq(batch).indices
    other = torch.ones_like(clean, dtype=torch.bool)
    other[0, 3] = False
    assert torch.equal(out.indices[other], clean[other])
