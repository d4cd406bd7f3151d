"""Fixed-length crops of in-memory waveforms: random ones to train, a fixed tiling to evaluate."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["FixedCropDataset", "RandomCropDataset", "fit_length"]


def fit_length(waveform: Tensor, length: int) -> Tensor:
    """Zero-pad (on the right) or cut ``waveform`` to exactly ``length`` samples."""
    if waveform.shape[-1] >= length:
        return waveform[..., :length]
    return F.pad(waveform, (0, length - waveform.shape[-1]))


class RandomCropDataset(Dataset[Tensor]):
    """Items are ``(1, length)`` crops at random offsets (drawn from torch's global RNG, which
    Lightning seeds per run and per worker). A clip appears once per ``length`` samples it
    holds (at least once), so an epoch covers the data about once whatever the clip lengths.
    """

    def __init__(self, clips: Sequence[Tensor], length: int) -> None:
        if length < 1:
            raise ValueError(f"crop length must be >= 1 sample, got {length}")
        self.clips = list(clips)
        self.length = int(length)
        self.index = [i for i, c in enumerate(self.clips) for _ in range(max(1, len(c) // length))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> Tensor:
        clip = self.clips[self.index[item]]
        spare = clip.shape[-1] - self.length
        start = int(torch.randint(0, spare + 1, ())) if spare > 0 else 0
        return fit_length(clip[start:], self.length).unsqueeze(0)


class FixedCropDataset(Dataset[Tensor]):
    """Every clip tiled by consecutive ``(1, length)`` windows in a fixed order, so validation
    metrics are deterministic and see all of every clip. The last window of a long clip ends at
    the clip's end (overlapping its neighbour); a clip shorter than ``length`` is zero-padded.
    """

    def __init__(self, clips: Sequence[Tensor], length: int) -> None:
        if length < 1:
            raise ValueError(f"crop length must be >= 1 sample, got {length}")
        self.clips = list(clips)
        self.length = int(length)
        self.windows = [
            (i, max(0, min(start, clip.shape[-1] - self.length)))
            for i, clip in enumerate(self.clips)
            for start in range(0, max(1, clip.shape[-1]), self.length)
        ]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, item: int) -> Tensor:
        i, start = self.windows[item]
        return fit_length(self.clips[i][start:], self.length).unsqueeze(0)
