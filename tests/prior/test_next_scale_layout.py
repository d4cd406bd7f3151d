"""The next-scale layout and codes per scale (src/prior/scales.py, next_scale_layout.py): exact
round trips codes -> sequence -> codes against a brute-force construction, agreement with
HierarchicalVQ's own slots, the level of every step, and the errors."""

from __future__ import annotations

import math

import pytest
import torch

from src.prior import NextScaleLayout, codes_to_scales, make_layout, scales_to_codes
from src.prior.scales import cell_map
from src.quantizers import HierarchicalVQ

# (scales, grid, codebook sizes per level)
CASES = [
    ([[1], [2], [4], [8], [16], [16]], (4, 4), [64] * 6),  # the tiny tokenizer's, 1-d cells
    ([[1], [3], [12]], (3, 4), [5, 7, 11]),  # uneven cells, one size per level
    ([[1, 1], [2, 2], [3, 4]], (3, 4), [9, 9, 9]),  # cells per grid axis (VAR's 2-d scales)
    ([[2], [5]], (5,), [4, 300]),  # an audio-like 1-d grid
]


def random_levels(scales, sizes, batch: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, s, (batch, *shape), generator=gen)
        for shape, s in zip(scales, sizes, strict=True)
    ]


@pytest.mark.parametrize(("scales", "grid", "sizes"), CASES)
@pytest.mark.parametrize("num_classes", [0, 10])
def test_round_trip_is_exact_and_coarse_first(scales, grid, sizes, num_classes) -> None:
    layout = make_layout("next_scale", sizes, grid, num_classes=num_classes, scales=scales)
    levels = random_levels(scales, sizes, batch=4, seed=len(scales))
    levels[0][0] = 0  # the extreme codes of every level appear
    for level, size in zip(levels, sizes, strict=True):
        level[1] = size - 1
    codes = scales_to_codes(levels, scales, grid)
    assert tuple(codes.shape) == (4, *grid, len(sizes))
    labels = torch.tensor([0, 9, -1, 3]) if num_classes else None
    tokens = layout.encode(codes, labels)

    # brute force: prefix, then level 0's cells in raster order, then level 1's, ...
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    for b in range(4):
        expected = [int(layout.prefix_tokens(labels, 4)[b])]
        for level, offset in zip(levels, offsets, strict=True):
            expected += [int(code) + offset for code in level[b].reshape(-1)]
        assert tokens[b].tolist() == expected
    assert layout.seq_len == 1 + sum(math.prod(s) for s in scales) == tokens.shape[1]
    assert torch.equal(layout.decode(tokens), codes)
    assert all(
        torch.equal(a, b) for a, b in zip(codes_to_scales(codes, scales), levels, strict=True)
    )
    assert int(layout.target_mask().sum()) == layout.seq_len - 1
    if num_classes:
        assert torch.equal(layout.labels_of(tokens), labels)


def test_every_position_takes_its_cells_code() -> None:
    # 2-d scale (2, 2) of a 3 x 4 grid: rows 0-1 | 2 -> cell rows 0 | 1 (floor(i * 2 / 3)),
    # columns 0-1 | 2-3; 1-d scale [3] of 12 positions: positions 0-3, 4-7, 8-11
    rows = [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3]]
    assert cell_map([2, 2], (3, 4)).view(3, 4).tolist() == rows
    assert cell_map([3], (3, 4)).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert cell_map([12], (3, 4)).tolist() == list(range(12))


def test_scales_of_hierarchical_vq_slots_agree() -> None:
    """The quantizer's slots (as the tokenizer's codes API has them) give back its own levels."""
    torch.manual_seed(0)
    scales = [1, 2, 4, 8, 16, 49]  # configs/quantizer/hierarchical_vq.yaml, capped at 12 tokens
    hvq = HierarchicalVQ(
        dim=4,
        codebook_size=16,
        scales=scales,
        channel_first=False,
        indices_layout="slots",
        kmeans_init=False,
    ).eval()
    tokens = torch.randn(3, 12, 4)
    slots = hvq(tokens).indices  # (3, 12, 6)
    grid = (3, 4)
    code_scales = [[min(s, 12)] for s in scales]
    codes = slots.reshape(3, *grid, 6)
    levels = codes_to_scales(codes, code_scales)
    quantizer_levels = hvq.slots_to_levels(slots, (12,))
    assert all(torch.equal(a, b) for a, b in zip(levels, quantizer_levels, strict=True))
    assert torch.equal(scales_to_codes(levels, code_scales, grid), codes)
    # and the decoded vectors of the slots equal those of the levels
    torch.testing.assert_close(
        hvq.decode_indices(slots), hvq.get_output_from_indices(levels, (12,)), rtol=0, atol=0
    )
    layout = NextScaleLayout([16] * 6, grid, scales=code_scales)
    assert torch.equal(layout.decode(layout.encode(codes)), codes)
    assert layout.seq_len == 1 + 1 + 2 + 4 + 8 + 12 + 12


def test_allowed_slices_follow_the_levels() -> None:
    layout = NextScaleLayout([5, 7, 11], (3, 4), num_classes=2, scales=[[1], [3], [12]])
    assert layout.allowed_slices(0) == (slice(23, 26),)  # 2 classes + null
    assert [layout.level_of_step(t) for t in range(1, 17)] == [0] + [1] * 3 + [2] * 12
    assert layout.allowed_slices(1) == (slice(0, 5),)
    assert layout.allowed_slices(4) == (slice(5, 12),)
    assert layout.allowed_slices(16) == (slice(12, 23),)
    logits = torch.zeros(layout.vocab_size)
    allowed = torch.isfinite(layout.constrain_logits(logits, 3)).nonzero().view(-1)
    assert allowed.tolist() == list(range(5, 12))


def test_bad_codes_and_settings_are_refused() -> None:
    scales = [[1], [2], [4]]
    layout = NextScaleLayout([8, 8, 8], (4,), scales=scales)
    levels = random_levels(scales, [8, 8, 8], batch=2, seed=0)
    codes = scales_to_codes(levels, scales, (4,))
    codes[0, 1, 1] = (codes[0, 0, 1] + 1) % 8  # positions 0 and 1 share a level-1 cell
    with pytest.raises(ValueError, match="differ within a cell"):
        layout.encode(codes)
    with pytest.raises(ValueError, match="needs the tokenizer's scales"):
        make_layout("next_scale", [8, 8, 8], (4,))
    with pytest.raises(ValueError, match="does not split codebooks"):
        NextScaleLayout([8, 8, 8], (4,), max_factor_bits=2, scales=scales)
    with pytest.raises(ValueError, match="2 scales for 3 code slots"):
        NextScaleLayout([8, 8, 8], (4,), scales=scales[:2])
    with pytest.raises(ValueError, match="must be \\[n\\] with 1 <= n <= 4"):
        NextScaleLayout([8, 8, 8], (4,), scales=[[1], [2], [5]])
    with pytest.raises(ValueError, match="level 1 codes must be"):
        scales_to_codes([levels[0], levels[2], levels[2]], scales, (4,))
