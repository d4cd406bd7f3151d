"""Grouped residual quantization (HiFi-Codec, Yang et al. 2023): the feature dim is split into
groups and each group gets its own residual quantizer.

Group protocol (what `GroupedResidual` needs from each group module, e.g. ResidualVQ):
- `group(x, *, num_kept=None, **kwargs)` returns a tuple (NamedTuple fine) whose first field
  is the quantized tensor (same shape as the group's slice of `x`) and whose other fields are
  tensors (or None); `num_kept` is the quantize-dropout depth to use (None: the group's own).
- `group.draw_num_kept(device)` gives that depth for this step (None when nothing is dropped),
  already agreed across ranks; the wrapper draws it once so all groups keep the same depth.
- `get_codes_from_indices` / `decode_indices` on one group's indices, and `codebook_size`,
  `num_quantizers`, `num_codebooks`.
The combined output has the groups' type: quantized concatenated back along the feature
axis, every other field stacked on a new leading group axis, e.g. indices (G, B, N, Q), and
`all_codes` (G, Q, B, N, d) where the reference's GroupedResidualFSQ returns a tuple of G
tensors (indexing by group, iterating and `len` behave the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from src.quantizers.communicator import Communicator, Distributable
from src.quantizers.contract import QuantizerContract
from src.quantizers.float_input import check_float_input
from src.quantizers.reference_checkpoint import register_reference_keys
from src.quantizers.residual import share_communicator


def _combine(outputs: Sequence[tuple], split_dim: int) -> tuple:
    """Concatenate the first fields along `split_dim`, stack the rest on a new axis 0."""
    fields: list[Tensor | None] = [torch.cat([o[0] for o in outputs], dim=split_dim)]
    for i in range(1, len(outputs[0])):
        values = [o[i] for o in outputs]
        fields.append(None if values[0] is None else torch.stack(values))
    first = outputs[0]
    return type(first)(*fields) if hasattr(first, "_fields") else tuple(fields)


class GroupedResidual(Distributable, QuantizerContract):
    """Runs one residual quantizer per slice of the feature axis and combines their outputs.

    The one grouped implementation of every family (GroupedResidualVQ / FSQ / LFQ): a
    subclass only names the residual quantizer of one `dim // groups` slice (`member`) and
    the keyword that makes it take channel-first maps (`member_channel_first`). `groups` is
    the number of groups (an int, as in the reference); the quantizers are `members`. Every
    keyword but `dim`, `groups` and `accept_image_fmap` goes to every member.
    """

    member: type[nn.Module]
    member_channel_first: str

    def __init__(
        self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs: Any
    ) -> None:
        super().__init__()
        if groups < 1 or dim % groups:
            raise ValueError(f"dim={dim} must be divisible by groups={groups}")
        layout = {self.member_channel_first: accept_image_fmap}
        self.members = nn.ModuleList(
            [self.member(dim=dim // groups, **layout, **kwargs) for _ in range(groups)]
        )
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = accept_image_fmap
        self.split_dim = 1 if accept_image_fmap else -1
        first = self.members[0]
        self.codebook_size: int = int(first.codebook_size)
        self.num_quantizers = int(first.num_quantizers)
        self.num_codebooks = groups * int(first.num_codebooks)
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)
        register_reference_keys(self)  # and the reference library's `rvqs.<g>.` keys

    @property
    def codebook_sizes(self) -> tuple[int, ...]:  # type: ignore[override]
        """Each slot's size, group-major (every group has its members' per-depth sizes)."""
        return tuple(self.members[0].codebook_sizes) * self.groups

    def set_communicator(self, communicator: Communicator) -> None:
        """Hand the communicator to every group too, even without `install_communicator`."""
        share_communicator(self, communicator)

    def draw_num_kept(self, device: torch.device | str = "cpu") -> int | None:
        """One quantize-dropout depth for all groups this step (None: all layers)."""
        return self.members[0].draw_num_kept(device)

    def forward(self, x: Tensor, **kwargs: object) -> tuple:
        """Quantize each feature slice with its group; `kwargs` go to every group."""
        check_float_input(x, type(self).__name__)
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(
                f"expected feature size {self.dim} on axis {self.split_dim}, got shape "
                f"{tuple(x.shape)}"
            )
        num_kept = self.draw_num_kept(x.device)
        chunks = x.chunk(self.groups, dim=self.split_dim)
        outputs = [
            g(c, num_kept=num_kept, **kwargs) for g, c in zip(self.members, chunks, strict=True)
        ]
        return _combine(outputs, self.split_dim)

    def _check_indices(self, indices: Tensor) -> None:
        if indices.ndim < 2 or indices.shape[0] != self.groups:
            raise ValueError(
                f"indices must be (groups={self.groups}, batch, ..., q), "
                f"got shape {tuple(indices.shape)}"
            )

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Per-group codes stacked on a leading group axis."""
        self._check_indices(indices)
        return torch.stack(
            [
                g.get_codes_from_indices(i)
                for g, i in zip(self.members, indices.unbind(0), strict=True)
            ]
        )

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Decoded groups concatenated along the feature axis, as forward returns them."""
        self._check_indices(indices)
        outputs = [
            g.decode_indices(i) for g, i in zip(self.members, indices.unbind(0), strict=True)
        ]
        return torch.cat(outputs, dim=self.split_dim)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The reference's name of `decode_indices`."""
        return self.decode_indices(indices)


def _rename_legacy_keys(state_dict: dict, prefix: str, *args: object) -> None:
    """Load checkpoints written before the grouped families shared this class: their group
    quantizers were stored under `groups.<i>.` (GroupedResidualVQ) or `grouped.groups.<i>.`
    (GroupedResidualFSQ / LFQ), now `members.<i>.`."""
    for old in (f"{prefix}grouped.groups.", f"{prefix}groups."):
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[f"{prefix}members." + key[len(old) :]] = state_dict.pop(key)
