"""A shuffling sampler whose position can be saved and restored, for exact mid-epoch resume.

Each pass (epoch) draws one permutation from the sampler's own generator. `state_dict(consumed)`
records the generator state from before the current permutation and how many indices training
has consumed, so a restored sampler replays the same permutation from that point; after a whole
pass it records the state that the next permutation starts from. Training, not the sampler,
says what was consumed: data loaders fetch ahead of the step that saved the checkpoint.

It is a `RandomSampler`, so under DDP Lightning swaps it for a `DistributedSampler` (seeded by
epoch) as it does for any shuffling loader; there, resume is exact at epoch boundaries.

Why it exists: Lightning restores the loops' progress but not a map-style loader's shuffle
position, so a run resumed mid-epoch skips the done batches of a *different* permutation
(it only warns "You're resuming from a checkpoint that ended before the epoch ended",
Lightning-AI/pytorch-lightning#18780; the "random sampler state" item of its fault-tolerance
plan, #9130, was never done). tests/test_resume.py checks that a run SIGKILLed mid-epoch and
resumed ends with the uninterrupted run's metrics and per-step CSV.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import RandomSampler


class ResumableRandomSampler(RandomSampler):
    """Shuffles ``data_source`` once per pass with a private generator seeded by ``seed``."""

    def __init__(self, data_source: Sized, seed: int) -> None:
        super().__init__(data_source, generator=torch.Generator().manual_seed(int(seed)))
        self._pass_start_state: torch.Tensor | None = None
        self._skip = 0

    def __iter__(self) -> Iterator[int]:
        self._pass_start_state = self.generator.get_state()
        order = torch.randperm(len(self.data_source), generator=self.generator)
        skip, self._skip = self._skip, 0
        yield from order[skip:].tolist()

    def state_dict(self, consumed: int | None) -> dict[str, Any]:
        """The position after ``consumed`` indices of the current pass; None = the pass is over."""
        if consumed is None or self._pass_start_state is None:
            return {"generator": self.generator.get_state(), "skip": 0}
        return {"generator": self._pass_start_state.clone(), "skip": int(consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict`: the next pass resumes the saved permutation."""
        self.generator.set_state(state["generator"])
        skip = int(state["skip"])
        if not 0 <= skip <= len(self.data_source):
            raise ValueError(
                f"saved sampler position {skip} is outside this dataset of "
                f"{len(self.data_source)} items: the data changed since the checkpoint"
            )
        self._skip = skip
