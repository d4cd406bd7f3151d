"""Sequence layouts: exact round trips, brute-force delay and factor construction, constraints,
class prefix and dropout, and the errors for codes or tokens outside the vocabulary."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from src.prior import (
    CodeFactors,
    DelayLayout,
    FactorizedLayout,
    FlattenLayout,
    make_layout,
)

# (codebook sizes per slot, grid, max_factor_bits)
CASES = [
    ([240], (7, 7), None),
    ([256, 256, 256, 256], (5,), None),
    ([1024, 17], (2, 3), None),
    ([2**18], (3, 4), 9),
    ([2**14, 2**10], (4,), 6),
    ([2**32], (2, 2), 9),
]


def _random_codes(sizes: list[int], grid: tuple[int, ...], batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    columns = [torch.randint(0, s, (batch, *grid), generator=gen) for s in sizes]
    return torch.stack(columns, dim=-1)


@pytest.mark.parametrize("name", ["flatten", "delay", "factorized"])
@pytest.mark.parametrize(("sizes", "grid", "bits"), CASES)
@pytest.mark.parametrize("num_classes", [0, 10])
def test_round_trip_is_exact(name, sizes, grid, bits, num_classes) -> None:
    layout = make_layout(name, sizes, grid, num_classes=num_classes, max_factor_bits=bits)
    codes = _random_codes(sizes, grid, batch=6, seed=len(sizes) + len(grid))
    # make the extreme codes appear: 0 and size-1 in every slot
    codes[0, ...] = 0
    codes[1, ...] = torch.tensor(sizes) - 1
    labels = torch.tensor([0, 3, -1, 9, 5, 1]) if num_classes else None
    tokens = layout.encode(codes, labels)
    expected_shape = (
        (6, layout.seq_len, layout.num_streams) if layout.multi_stream else (6, layout.seq_len)
    )
    assert tuple(tokens.shape) == expected_shape
    assert tokens.min() >= 0 and tokens.max() < layout.vocab_size
    assert torch.equal(layout.decode(tokens), codes)
    if num_classes:
        assert torch.equal(layout.labels_of(tokens), labels)
    else:
        assert (layout.labels_of(tokens) == -1).all()
    # every code is one loss target per slot factor, nothing else
    assert int(layout.target_mask().sum()) == math.prod(grid) * len(layout.slot_sizes)


def test_flatten_matches_brute_force_construction() -> None:
    sizes, grid = [5, 3, 7], (2, 3)
    layout = FlattenLayout(sizes, grid, num_classes=4)
    codes = _random_codes(sizes, grid, batch=3, seed=1)
    tokens = layout.encode(codes, torch.tensor([2, -1, 0]))
    offsets = [0, 5, 8]
    for b in range(3):
        expected = [15 + [2, 4, 0][b]]  # class tokens start at 5+3+7=15, null = 15+4
        for i, j in itertools.product(range(2), range(3)):  # raster order
            expected += [offsets[q] + int(codes[b, i, j, q]) for q in range(3)]
        assert tokens[b].tolist() == expected
    assert layout.null_token == 19 and layout.vocab_size == 20


def test_delay_matches_brute_force_construction() -> None:
    sizes, grid = [6, 4, 9, 2], (3, 2)
    layout = DelayLayout(sizes, grid, num_classes=3)
    codes = _random_codes(sizes, grid, batch=2, seed=2)
    tokens = layout.encode(codes, torch.tensor([1, 2]))
    positions = codes.reshape(2, 6, 4)
    num_q, num_p, pad = 4, 6, layout.pad_token
    assert layout.seq_len == 1 + num_p + num_q - 1
    assert pad == max(sizes) + 3 + 1 and layout.vocab_size == pad + 1
    for b in range(2):
        assert tokens[b, 0].tolist() == [max(sizes) + [1, 2][b]] * num_q
        for t in range(num_p + num_q - 1):
            for q in range(num_q):
                p = t - q
                want = int(positions[b, p, q]) if 0 <= p < num_p else pad
                assert int(tokens[b, 1 + t, q]) == want, (b, t, q)
    valid = layout.valid_mask()
    for t, q in itertools.product(range(num_p + num_q - 1), range(num_q)):
        assert bool(valid[t, q]) == (0 <= t - q < num_p)
    # shift / unshift are inverse on any values, with any fill
    values = torch.randn(2, num_p, num_q)
    shifted = layout.shift(values, fill=float("nan"))
    assert torch.equal(layout.unshift(shifted), values)
    assert torch.equal(torch.isnan(shifted), ~valid.expand(2, -1, -1))


def test_factors_are_bit_groups() -> None:
    factors = CodeFactors([2**18, 100, 2**14], max_factor_bits=9)
    assert factors.factor_sizes == (2**9, 2**9, 100, 2**7, 2**7)
    assert factors.slot_of_factor == (0, 0, 1, 2, 2)
    codes = _random_codes([2**18, 100, 2**14], (50,), batch=2, seed=3)
    split = factors.split(codes)
    for b, p in itertools.product(range(2), range(50)):
        k0, k1, k2 = (int(v) for v in codes[b, p])
        assert split[b, p].tolist() == [k0 >> 9, k0 & 511, k1, k2 >> 7, k2 & 127]
    assert torch.equal(factors.merge(split), codes)
    # uneven groups: 2^32 at most 9 bits -> four groups of 8 bits
    assert CodeFactors([2**32], 9).factor_sizes == (256,) * 4
    assert CodeFactors([2**19], 9).factor_sizes == (2**7, 2**6, 2**6)


def test_factorized_never_needs_the_full_softmax() -> None:
    layout = FactorizedLayout([2**18], (16, 16), num_classes=10)
    assert layout.num_streams == 2 and layout.slot_sizes == (512, 512)
    assert layout.vocab_size == 512 + 10 + 2  # per-head softmax width
    assert layout.seq_len == 1 + 256  # no delay: one step per position
    assert layout.allowed_slices(5) == (slice(0, 512), slice(0, 512))


def test_allowed_slices_are_exactly_the_encoded_ranges() -> None:
    """Over many random grids, the set of ids seen at each step equals its allowed slice."""
    sizes, grid = [3, 2], (2,)
    for layout in (FlattenLayout(sizes, grid, 2), DelayLayout(sizes, grid, 2)):
        codes = _random_codes(sizes, grid, batch=400, seed=4)
        labels = torch.randint(-1, 2, (400,), generator=torch.Generator().manual_seed(5))
        tokens = layout.encode(codes, labels)
        view = tokens if layout.multi_stream else tokens.unsqueeze(-1)
        for step in range(layout.seq_len):
            for s, allowed in enumerate(layout.allowed_slices(step)):
                seen = set(view[:, step, s].tolist())
                assert seen == set(range(allowed.start, allowed.stop)), (layout.name, step, s)
        masks = layout.allowed_masks()
        assert masks.shape[0] == layout.seq_len
        for step in range(layout.seq_len):
            row = masks[step] if layout.multi_stream else masks[step].unsqueeze(0)
            for s, allowed in enumerate(layout.allowed_slices(step)):
                assert row[s].nonzero().flatten().tolist() == list(
                    range(allowed.start, allowed.stop)
                )


def test_constrain_logits_masks_outside_the_slot() -> None:
    layout = FlattenLayout([4, 3], (2,), num_classes=2)
    logits = torch.zeros(5, 16)  # a model whose vocabulary is padded past layout.vocab_size=10
    constrained = layout.constrain_logits(logits, step=2)  # step 2 -> slot 1 -> ids 4..6
    finite = torch.isfinite(constrained)
    assert finite[:, 4:7].all() and finite.sum() == 5 * 3
    with pytest.raises(ValueError, match="smaller than"):
        layout.constrain_logits(torch.zeros(5, 8), step=1)
    for step in range(layout.seq_len):  # the cached table agrees with each step's mask
        kept = torch.isfinite(layout.constrain_logits(torch.zeros(2, 16), step))
        assert torch.equal(kept, layout.allowed_mask(step, 16).expand(2, -1))
    delay = DelayLayout([4, 3], (2,), num_classes=2)
    masked = delay.constrain_logits(torch.zeros(5, 2, delay.vocab_size), step=1)
    # step 1: stream 0 holds position 0's code, stream 1 is still padding
    assert torch.isfinite(masked[:, 0]).sum(-1).eq(4).all()
    assert torch.isfinite(masked[:, 1]).nonzero()[:, -1].eq(delay.pad_token).all()


def test_class_dropout_rate_and_determinism() -> None:
    layout = FlattenLayout([8], (2, 2), num_classes=10)
    codes = torch.zeros(20000, 2, 2, 1, dtype=torch.long)
    labels = torch.arange(20000) % 10
    a = layout.encode(codes, labels, 0.1, torch.Generator().manual_seed(0))
    b = layout.encode(codes, labels, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    dropped = layout.labels_of(a) == -1
    # binomial(20000, 0.1): sd 42; 5 sd either side
    assert abs(int(dropped.sum()) - 2000) < 5 * 42
    kept = ~dropped
    assert torch.equal(layout.labels_of(a)[kept], labels[kept])
    assert (layout.labels_of(layout.encode(codes, labels, 1.0)) == -1).all()


def test_codes_outside_the_vocabulary_are_rejected() -> None:
    layout = FlattenLayout([16, 8], (2, 2))
    codes = torch.zeros(2, 2, 2, 2, dtype=torch.long)
    codes[1, 0, 1, 1] = 8
    with pytest.raises(ValueError, match=r"slot 1 must lie in \[0, 8\).*\[0, 8\]"):
        layout.encode(codes)
    codes[1, 0, 1, 1] = -1
    with pytest.raises(ValueError, match=r"slot 1 must lie in \[0, 8\)"):
        layout.encode(codes)
    with pytest.raises(ValueError, match="Q=2"):
        layout.encode(torch.zeros(2, 2, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="grid"):
        layout.encode(torch.zeros(2, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        layout.encode(torch.zeros(2, 2, 2, 2))
    with pytest.raises(ValueError, match="2\\*\\*max_factor_bits"):
        FactorizedLayout([1000], (2,), max_factor_bits=5)


def test_bad_sequences_and_labels_are_rejected() -> None:
    layout = FlattenLayout([16, 8], (2,), num_classes=3)
    tokens = layout.encode(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([1]))
    bad = tokens.clone()
    bad[0, 2] = 3  # step 2 holds slot 1: ids 16..23
    with pytest.raises(ValueError, match=r"step 2.*\[16, 24\)"):
        layout.decode(bad)
    bad = tokens.clone()
    bad[0, 0] = 5  # a code where the class token belongs
    with pytest.raises(ValueError, match="step 0"):
        layout.decode(bad)
    with pytest.raises(ValueError, match="shape"):
        layout.decode(tokens[:, :-1])
    with pytest.raises(ValueError, match="pass labels"):
        layout.encode(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        layout.encode(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([3]))
    with pytest.raises(ValueError, match="unconditional"):
        FlattenLayout([16], (2,)).encode(torch.zeros(1, 2, 1, dtype=torch.long), torch.tensor([0]))
    delay = DelayLayout([4, 4], (3,))
    tokens = delay.encode(torch.zeros(1, 3, 2, dtype=torch.long))
    tokens[0, 1, 1] = 0  # stream 1 must still be padding at step 1
    with pytest.raises(ValueError, match="stream 1"):
        delay.decode(tokens)
    with pytest.raises(ValueError, match="unknown layout"):
        make_layout("zigzag", [4], (2,))
