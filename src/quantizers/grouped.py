"""Grouped residual quantization (HiFi-Codec, Yang et al. 2023): the feature dim is split into
groups and each group gets its own residual quantizer.

Group protocol (what `GroupedResidual` needs from each group module, e.g. ResidualVQ):
- `group(x, *, num_kept=None, **kwargs)` returns a tuple (NamedTuple fine) whose first field
  is the quantized tensor (same shape as the group's slice of `x`) and whose other fields are
  tensors (or None); `num_kept` is the quantize-dropout depth to use (None: the group's own).
- `group.draw_num_kept(device)` gives that depth for this step (None when nothing is dropped),
  already agreed across ranks; the wrapper draws it once so all groups keep the same depth.
- `get_codes_from_indices` / `get_output_from_indices` on one group's indices.
The combined output has the groups' type: quantized concatenated back along the feature
axis, every other field stacked on a new leading group axis, e.g. indices (G, B, N, Q).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from src.quantizers.communicator import Communicator, Distributable
from src.quantizers.residual import share_communicator


def _combine(outputs: Sequence[tuple], split_dim: int) -> tuple:
    """Concatenate the first fields along `split_dim`, stack the rest on a new axis 0."""
    fields: list[Tensor | None] = [torch.cat([o[0] for o in outputs], dim=split_dim)]
    for i in range(1, len(outputs[0])):
        values = [o[i] for o in outputs]
        fields.append(None if values[0] is None else torch.stack(values))
    first = outputs[0]
    return type(first)(*fields) if hasattr(first, "_fields") else tuple(fields)


class GroupedResidual(Distributable):
    """Runs one quantizer per slice of the feature axis and combines their outputs."""

    def __init__(self, groups: Sequence[nn.Module], dim: int, split_dim: int = -1) -> None:
        super().__init__()
        if len(groups) < 1 or dim % len(groups) != 0:
            raise ValueError(f"dim={dim} must split evenly into {len(groups)} groups")
        self.groups = nn.ModuleList(groups)
        self.dim = dim
        self.split_dim = split_dim

    @classmethod
    def split_evenly(
        cls, make_group: Callable[[int], nn.Module], dim: int, groups: int, channel_first: bool
    ) -> GroupedResidual:
        """`groups` modules built by `make_group(dim // groups)`, one per feature slice."""
        if groups < 1 or dim % groups:
            raise ValueError(f"dim={dim} must split evenly into groups={groups}")
        members = [make_group(dim // groups) for _ in range(groups)]
        return cls(members, dim, split_dim=1 if channel_first else -1)

    def set_communicator(self, communicator: Communicator) -> None:
        """Hand the communicator to every group too, even without `install_communicator`."""
        share_communicator(self, communicator)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def forward(self, x: Tensor, **kwargs: object) -> tuple:
        """Quantize each feature slice with its group; `kwargs` go to every group."""
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(
                f"expected feature size {self.dim} on axis {self.split_dim}, got shape "
                f"{tuple(x.shape)}"
            )
        num_kept = self.groups[0].draw_num_kept(x.device)
        chunks = x.chunk(self.num_groups, dim=self.split_dim)
        outputs = [
            g(c, num_kept=num_kept, **kwargs) for g, c in zip(self.groups, chunks, strict=True)
        ]
        return _combine(outputs, self.split_dim)

    def _check_indices(self, indices: Tensor) -> None:
        if indices.ndim < 2 or indices.shape[0] != self.num_groups:
            raise ValueError(
                f"indices must be (groups={self.num_groups}, batch, ..., q), "
                f"got shape {tuple(indices.shape)}"
            )

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Per-group codes stacked on a leading group axis."""
        self._check_indices(indices)
        return torch.stack(
            [
                g.get_codes_from_indices(i)
                for g, i in zip(self.groups, indices.unbind(0), strict=True)
            ]
        )

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Decoded groups concatenated along the feature axis, as forward returns them."""
        self._check_indices(indices)
        outputs = [
            g.get_output_from_indices(i)
            for g, i in zip(self.groups, indices.unbind(0), strict=True)
        ]
        return torch.cat(outputs, dim=self.split_dim)
