"""CodebookUsage: hand-computed values, masking, accumulation, errors, brute force."""

from __future__ import annotations

import copy
import math
import pickle
from collections import Counter

import pytest
import torch

from src.metrics import CodebookUsage


def _reference(indices: list[list[int]], size: int) -> dict[str, list[float]]:
    """Per-codebook statistics with Counter and math, ignoring -1."""
    stats: dict[str, list[float]] = {"utilization": [], "perplexity": [], "dead_codes": []}
    for column in indices:
        counter = Counter(i for i in column if i != -1)
        total = sum(counter.values())
        entropy = -sum(c / total * math.log(c / total) for c in counter.values())
        stats["utilization"].append(len(counter) / size)
        stats["dead_codes"].append(size - len(counter))
        stats["perplexity"].append(math.exp(entropy) if total else 0.0)
    return stats


def test_hand_computed_values() -> None:
    metric = CodebookUsage(codebook_size=4)
    metric.update(torch.tensor([0, 0, 1, 3]))
    out = metric.compute()
    expected_perplexity = math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert out["utilization"].item() == pytest.approx(0.75)
    assert out["dead_codes"].item() == pytest.approx(1.0)
    assert out["perplexity"].item() == pytest.approx(expected_perplexity)
    assert expected_perplexity == pytest.approx(2.8284271)
    torch.testing.assert_close(out["code_frequencies"], torch.tensor([[0.5, 0.25, 0.0, 0.25]]))
    assert out["utilization_per_codebook"].shape == (1,)


def test_uniform_usage_has_perplexity_codebook_size() -> None:
    metric = CodebookUsage(codebook_size=8)
    metric.update(torch.arange(8).repeat(3))
    assert metric.compute()["perplexity"].item() == pytest.approx(8.0)


def test_multiple_codebooks() -> None:
    metric = CodebookUsage(codebook_size=4, num_codebooks=2)
    # codebook 0 sees 0, 0, 1, 3; codebook 1 sees 2 only.
    metric.update(torch.tensor([[[0, 2], [0, 2]], [[1, 2], [3, 2]]]))
    out = metric.compute()
    torch.testing.assert_close(out["utilization_per_codebook"], torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(out["dead_codes_per_codebook"], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(
        out["perplexity_per_codebook"], torch.tensor([2 * math.sqrt(2), 1.0])
    )
    assert out["utilization"].item() == pytest.approx(0.5)
    assert out["dead_codes"].item() == pytest.approx(2.0)
    assert out["perplexity"].item() == pytest.approx((2 * math.sqrt(2) + 1) / 2)
    assert out["code_frequencies"].shape == (2, 4)


def test_minus_one_is_ignored() -> None:
    metric = CodebookUsage(codebook_size=4, num_codebooks=2)
    metric.update(torch.tensor([[0, -1], [-1, -1], [0, 3]]))
    counts = metric.counts
    assert counts.tolist() == [[2, 0, 0, 0], [0, 0, 0, 1]]


def test_single_codebook_accepts_any_shape() -> None:
    metric = CodebookUsage(codebook_size=10)
    metric.update(torch.randint(0, 10, (2, 8, 8)))
    metric.update(torch.randint(0, 10, (2, 8, 8, 1)))  # keep_num_codebooks_dim layout
    assert metric.counts.sum().item() == 256


def test_accumulation_equals_one_update_on_concatenation() -> None:
    chunks = [torch.randint(-1, 16, (n, 3)) for n in (5, 17, 40)]
    accumulated = CodebookUsage(codebook_size=16, num_codebooks=3)
    for chunk in chunks:
        accumulated.update(chunk)
    once = CodebookUsage(codebook_size=16, num_codebooks=3)
    once.update(torch.cat(chunks))
    assert torch.equal(accumulated.counts, once.counts)
    for name, value in accumulated.compute().items():
        assert torch.equal(value, once.compute()[name]), name


def test_reset_and_empty_state() -> None:
    metric = CodebookUsage(codebook_size=4, num_codebooks=2)
    metric.update(torch.tensor([[1, 2]]))
    metric.reset()
    assert metric.counts.sum().item() == 0
    with pytest.warns(UserWarning, match="before the ``update``"):
        out = metric.compute()
    for value in out.values():
        assert not torch.isnan(value).any()
    assert out["utilization"].item() == 0.0
    assert out["perplexity"].item() == 0.0  # documented: nothing seen -> perplexity 0
    assert out["dead_codes"].item() == 4.0
    assert out["code_frequencies"].sum().item() == 0.0


@pytest.mark.parametrize("bad", [[0, 4], [-2, 1]])
def test_out_of_range_indices(bad: list[int]) -> None:
    metric = CodebookUsage(codebook_size=4)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        metric.update(torch.tensor(bad))


def test_wrong_codebook_dim_and_dtype() -> None:
    metric = CodebookUsage(codebook_size=4, num_codebooks=2)
    with pytest.raises(ValueError, match="num_codebooks=2"):
        metric.update(torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.zeros(5, 2))


def test_huge_codebook_is_counted_sparsely() -> None:
    with pytest.raises(ValueError, match="exact per-code counts are not supported"):
        CodebookUsage(codebook_size=2**24 + 1, sparse=False)
    metric = CodebookUsage(codebook_size=2**32, num_codebooks=2)
    assert metric.sparse
    indices = torch.tensor([[0, 2**32 - 1], [0, 5], [7, -1]])
    metric.update(indices)
    out = metric.compute()
    torch.testing.assert_close(
        out["dead_codes_per_codebook"],
        torch.tensor([2**32 - 2, 2**32 - 2], dtype=torch.float32),
    )
    torch.testing.assert_close(
        out["utilization_per_codebook"], torch.tensor([2 / 2**32, 2 / 2**32])
    )
    expected = math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    torch.testing.assert_close(out["perplexity_per_codebook"], torch.tensor([expected, 2.0]))
    assert "code_frequencies" not in out
    CodebookUsage(codebook_size=2**10, num_codebooks=2)


@pytest.mark.parametrize(("size", "num_codebooks"), [(7, 1), (300, 3)])
def test_sparse_equals_dense(size: int, num_codebooks: int) -> None:
    """Same values as dense counting, across many updates (so merges happen) and masking."""
    gen = torch.Generator().manual_seed(size)
    dense = CodebookUsage(codebook_size=size, num_codebooks=num_codebooks)
    sparse = CodebookUsage(codebook_size=size, num_codebooks=num_codebooks, sparse=True)
    sparse.merge_floor = 64
    for step in range(40):
        batch = (torch.rand(50 + step, num_codebooks, generator=gen) ** 3 * size).long()
        batch[torch.rand(batch.shape, generator=gen) < 0.1] = -1
        dense.update(batch)
        sparse.update(batch)
    want, got = dense.compute(), sparse.compute()
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], msg=name)
    assert len(sparse.seen_keys) < 40  # pending pairs were merged along the way


def test_sparse_memory_is_bounded_by_codes_seen() -> None:
    metric = CodebookUsage(codebook_size=2**32)
    metric.merge_floor = 1000
    for _ in range(200):  # the same 100 codes again and again: 20,000 keys without merging
        metric.update(torch.arange(100) * 2**20)
        assert sum(k.numel() for k in metric.seen_keys) <= 100 + 1000
    assert metric.compute()["dead_codes"].item() == pytest.approx(2**32 - 100)


def test_sparse_counts_are_summed_across_ranks() -> None:
    indices = torch.randint(-1, 8, (100, 2)) * 2**28
    indices[indices < 0] = -1
    rank0, rank1, single = (CodebookUsage(codebook_size=2**31, num_codebooks=2) for _ in range(3))
    rank0.update(indices[:30])
    rank1.update(indices[30:])
    rank0.merge_state(rank1)
    single.update(indices)
    for name, value in single.compute().items():
        torch.testing.assert_close(rank0.compute()[name], value, msg=name)


def test_counts_are_summed_across_ranks() -> None:
    """merge_state applies the same reduction (sum) that DDP sync applies to the states."""
    indices = torch.randint(-1, 8, (100, 2))
    rank0, rank1 = (CodebookUsage(codebook_size=8, num_codebooks=2) for _ in range(2))
    rank0.update(indices[:30])
    rank1.update(indices[30:])
    rank0.merge_state(rank1)
    single = CodebookUsage(codebook_size=8, num_codebooks=2)
    single.update(indices)
    assert rank0.counts.dtype == torch.int64
    assert torch.equal(rank0.counts, single.counts)


def test_per_codebook_shapes_survive_copy_and_forward() -> None:
    metric = CodebookUsage(codebook_size=1)
    batch_out = metric(torch.zeros(3, dtype=torch.long))  # forward: values of this batch
    assert batch_out["utilization_per_codebook"].shape == (1,)
    assert batch_out["code_frequencies"].shape == (1, 1)
    for clone in (copy.deepcopy(metric), pickle.loads(pickle.dumps(metric))):
        out = clone.compute()
        assert out["perplexity_per_codebook"].shape == (1,)
        assert out["utilization"].shape == ()
        assert out["utilization"].item() == 1.0


@pytest.mark.parametrize(("size", "num_codebooks"), [(7, 1), (32, 4), (300, 2)])
def test_brute_force_against_counter(size: int, num_codebooks: int) -> None:
    gen = torch.Generator().manual_seed(size)
    metric = CodebookUsage(codebook_size=size, num_codebooks=num_codebooks)
    batches = []
    for _ in range(3):
        # A skewed distribution so some codes stay dead and entropy is not maximal.
        batch = (torch.rand(50, num_codebooks, generator=gen) ** 3 * size).long()
        batch[torch.rand(batch.shape, generator=gen) < 0.1] = -1
        metric.update(batch if num_codebooks > 1 else batch.squeeze(-1))
        batches.append(batch)
    columns = torch.cat(batches).T.tolist()
    expected = _reference(columns, size)
    out = metric.compute()
    for name, values in expected.items():
        torch.testing.assert_close(
            out[f"{name}_per_codebook"], torch.tensor(values, dtype=torch.float32)
        )
        assert out[name].item() == pytest.approx(sum(values) / len(values), rel=1e-6)
    for c, column in enumerate(columns):
        counter = Counter(i for i in column if i != -1)
        assert metric.counts[c].tolist() == [counter[k] for k in range(size)]


@pytest.mark.parametrize("sparse", [False, True])
def test_a_size_per_codebook(sparse: bool) -> None:
    """`codebook_sizes` (a residual VQ with codebook_size=(3, 8)): each slot's utilization and
    dead codes are over its own size, its range is checked against it; equal sizes count as
    without them."""
    metric = CodebookUsage(codebook_size=8, num_codebooks=2, sparse=sparse, codebook_sizes=(3, 8))
    columns = [[0, 1, 1, -1, 2, 0], [7, 7, 0, 5, -1, 1]]
    metric.update(torch.tensor(columns).t())
    out = metric.compute()
    expected = _reference([columns[0]], 3), _reference([columns[1]], 8)
    for name in ("utilization", "perplexity", "dead_codes"):
        want = torch.tensor([e[name][0] for e in expected], dtype=torch.float32)
        torch.testing.assert_close(out[f"{name}_per_codebook"], want, msg=name)
        torch.testing.assert_close(out[name], want.mean(), msg=name)
    if not sparse:  # rows padded to the largest codebook, zero past a slot's size
        assert out["code_frequencies"].shape == (2, 8)
        assert bool((out["code_frequencies"][0, 3:] == 0).all())
    with pytest.raises(ValueError, match=r"codebook 0 must lie in \[0, 2\].*\[3, 3\]"):
        metric.update(torch.tensor([[3, 0]]))
    with pytest.raises(ValueError, match="codebook_sizes"):
        CodebookUsage(codebook_size=8, num_codebooks=2, codebook_sizes=(3, 4))
    equal = CodebookUsage(codebook_size=4, num_codebooks=2, codebook_sizes=(4, 4))
    plain = CodebookUsage(codebook_size=4, num_codebooks=2)
    batch = torch.tensor([[0, 3], [1, 3], [-1, 2]])
    equal.update(batch)
    plain.update(batch)
    assert equal.slot_sizes is None
    for name, value in plain.compute().items():
        assert torch.equal(equal.compute()[name], value), name
