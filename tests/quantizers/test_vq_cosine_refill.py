"""Cosine codebooks stay unit-norm: dead codes are never refilled from (near-)zero latents,
k-means never seeds from them and an EMA mean that vanishes keeps the previous code."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from src.quantizers import VectorQuantize
from src.quantizers.kernels import dead_code_replacements, l2_normalize
from src.quantizers.kernels.codebook_ops import refill_candidates

DIM, CODES = 8, 32


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _mostly_zero(batch: int, tokens: int, nonzero: int, width: int = DIM) -> torch.Tensor:
    """(batch, tokens, width) zeros with `nonzero` random tokens at random positions."""
    x = torch.zeros(batch * tokens, width)
    x[torch.randperm(batch * tokens)[:nonzero]] = torch.randn(nonzero, width)
    return x.reshape(batch, tokens, width)


def _assert_unit_rows(codes: torch.Tensor) -> None:
    assert torch.isfinite(codes).all()
    norms = codes.reshape(-1, codes.shape[-1]).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


# ---- the kernel -----------------------------------------------------------------------------


@pytest.mark.parametrize("books", [1, 3])
def test_replacements_draw_only_usable_rows_and_each_once(books: int) -> None:
    pool = torch.arange(books * 20, dtype=torch.float32).reshape(books, 20, 1)  # row ids
    usable = torch.rand(books, 20) < 0.3
    usable[0, :3] = True  # at least 3 usable rows everywhere
    usable[:, 3:6] = True
    size = torch.zeros(books, 12)  # all 12 codes dead
    for _ in range(20):
        take, vectors = dead_code_replacements(size, 1.0, pool, usable)
        for b in range(books):
            drawn = vectors[b, take[b], 0].long() - b * 20
            assert int(take[b].sum()) == min(12, int(usable[b].sum()))
            assert take[b, : int(take[b].sum())].all()  # dead codes in index order
            assert len(set(drawn.tolist())) == len(drawn)  # no row twice
            assert usable[b, drawn].all()


def test_replacements_with_no_usable_row_take_nothing() -> None:
    take, _ = dead_code_replacements(
        torch.zeros(1, 4), 1.0, torch.randn(1, 6, 2), torch.zeros(1, 6, dtype=torch.bool)
    )
    assert not take.any()


def test_every_usable_row_is_drawn_alike() -> None:
    """The usable rows are drawn uniformly: about equally often as the first refill."""
    usable = torch.tensor([[True, False, True, True, False, True]])
    pool = torch.arange(6.0).reshape(1, 6, 1)
    first = torch.zeros(6)
    for _ in range(4000):
        _, vectors = dead_code_replacements(torch.zeros(1, 1), 1.0, pool, usable)
        first[int(vectors[0, 0, 0])] += 1
    assert (first[~usable[0]] == 0).all()
    torch.testing.assert_close(first[usable[0]] / 4000, torch.full((4,), 0.25), atol=0.03, rtol=0)


def test_only_cosine_pools_leave_rows_out() -> None:
    pool = F.normalize(torch.randn(1, 5, 4), dim=-1)
    pool[0, 1] = 0.0
    pool[0, 3] = l2_normalize(torch.full((4,), 1e-8))  # |x| below the norm floor: not unit
    assert refill_candidates(pool, use_cosine_sim=False) is None
    expected = torch.tensor([[True, False, True, False, True]])
    assert torch.equal(refill_candidates(pool, use_cosine_sim=True), expected)


# ---- the quantizer --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"kmeans_init": True},
        {"heads": 2, "separate_codebook_per_head": True},
        {"heads": 2, "separate_codebook_per_head": False},
    ],
)
def test_refills_from_a_mostly_zero_batch_are_distinct_unit_tokens(kwargs: dict) -> None:
    heads = kwargs.get("heads", 1)
    vq = VectorQuantize(
        dim=DIM * heads,
        codebook_size=CODES,
        codebook_dim=DIM,
        use_cosine_sim=True,
        threshold_ema_dead_code=1e6,  # every code is dead after one step
        **kwargs,
    )
    x = _mostly_zero(2, 64, nonzero=5, width=DIM * heads)
    vq(x)
    tokens = x.reshape(-1, heads, DIM)
    tokens = F.normalize(tokens[tokens.norm(dim=-1).gt(0).all(dim=-1)], dim=-1)  # (5, heads, d)
    # a shared codebook draws from every head's slices, a head's own one from that head's
    pools = [tokens.reshape(-1, DIM)] if vq.num_books == 1 else list(tokens.transpose(0, 1))
    books = vq.embed.reshape(-1, CODES, DIM)
    sizes = vq.cluster_size.reshape(-1, CODES)
    for book, size, pool in zip(books, sizes, pools, strict=True):
        _assert_unit_rows(book)
        refills = book[size == 1e6]
        assert refills.shape[0] == pool.shape[0]  # every nonzero slice, and nothing else
        matches = torch.cdist(refills, pool) < 1e-6
        assert (matches.sum(dim=1) == 1).all()  # each refill is one of the tokens ...
        assert (matches.sum(dim=0) == 1).all()  # ... and no token refills two codes


def test_refills_skip_masked_and_zero_tokens_together() -> None:
    vq = VectorQuantize(
        dim=DIM, codebook_size=CODES, use_cosine_sim=True, threshold_ema_dead_code=1e6
    )
    x = _mostly_zero(1, 40, nonzero=8)
    valid = x.norm(dim=-1) > 0
    mask = torch.ones(1, 40, dtype=torch.bool)
    mask[valid] = torch.tensor([True, False] * 4)  # mask out half of the nonzero tokens
    vq(x, mask=mask)
    _assert_unit_rows(vq.embed)
    refills = vq.embed[vq.cluster_size == 1e6]
    allowed = F.normalize(x[valid & mask], dim=-1)
    assert refills.shape[0] == 4
    assert (torch.cdist(refills, allowed) < 1e-6).sum(dim=1).eq(1).all()


def test_all_zero_batch_leaves_cosine_codes_as_they_were() -> None:
    vq = VectorQuantize(
        dim=DIM, codebook_size=CODES, use_cosine_sim=True, threshold_ema_dead_code=1e6
    )
    before = vq.embed.clone()
    vq(torch.zeros(2, 16, DIM))
    _assert_unit_rows(vq.embed)
    torch.testing.assert_close(vq.embed, before)


def test_euclidean_refills_may_be_zero_vectors() -> None:
    """The origin is a point like any other in Euclidean mode: zero tokens stay in the pool."""
    vq = VectorQuantize(dim=DIM, codebook_size=CODES, threshold_ema_dead_code=1e6)
    vq(torch.zeros(1, 40, DIM))
    assert (vq.embed == 0).all(dim=-1).all()


def test_cosine_codes_stay_unit_norm_through_kmeans_ema_and_expiry() -> None:
    """codebook_dim == dim: no projection, so zero tokens reach the codebook state as zeros."""
    vq = VectorQuantize(
        dim=DIM,
        codebook_size=CODES,
        use_cosine_sim=True,
        kmeans_init=True,
        kmeans_iters=5,
        threshold_ema_dead_code=2.0,
        decay=0.5,
    )
    assert vq.codebook_dim == vq.dim
    first = _mostly_zero(2, 40, nonzero=6)  # fewer usable tokens than codes: k-means repeats
    vq(first)
    assert bool(vq.initted)
    _assert_unit_rows(vq.embed)
    revived = 0
    for step in range(12):
        x = _mostly_zero(2, 40, nonzero=4 + 3 * step)
        if step % 3 == 0:
            x = torch.cat([x, torch.randn(1, 40, DIM) * 5])  # a full batch now and then
        x.requires_grad_(True)
        quantized, _, loss = vq(x)
        (quantized.sum() + loss.sum()).backward()
        assert torch.isfinite(quantized).all() and torch.isfinite(x.grad).all()
        _assert_unit_rows(vq.embed)
        _assert_unit_rows(vq.codebook)
        assert all(torch.isfinite(t).all() for t in vq.state_dict().values())
        revived += int((vq.cluster_size == 2.0).sum())
    assert revived > 0  # expiry did run


def test_kmeans_waits_for_a_batch_with_a_direction() -> None:
    vq = VectorQuantize(dim=DIM, codebook_size=4, use_cosine_sim=True, kmeans_init=True)
    vq(torch.zeros(1, 10, DIM))
    assert not bool(vq.initted)
    vq(_mostly_zero(1, 10, nonzero=3))
    assert bool(vq.initted)
    _assert_unit_rows(vq.embed)


def test_compiled_cosine_expiry_has_no_graph_break() -> None:
    vq = VectorQuantize(
        dim=DIM, codebook_size=CODES, use_cosine_sim=True, threshold_ema_dead_code=1e6
    )
    twin = copy.deepcopy(vq)
    x = _mostly_zero(2, 20, nonzero=7)
    compiled = torch.compile(vq, backend="aot_eager", fullgraph=True)
    torch.manual_seed(5)
    compiled(x)
    torch.manual_seed(5)
    twin(x)
    _assert_unit_rows(vq.embed)
    torch.testing.assert_close(vq.embed, twin.embed)
