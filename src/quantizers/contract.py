"""The contract every registered quantizer keeps, on top of the reference guide's API.

Framework code (the tokenizers, the codes API, the usage metrics) relies on these names only,
never on `getattr` guesses:

- `codebook_size: int`: the number of codes of each code slot's codebook.
- `num_codebooks: int` (Q): codes emitted per token position (residual depth x groups x heads;
  1 for a single codebook).
- `codebook_sizes: tuple[int, ...]`: length Q, the size of each slot in the order the
  framework reads the slots (`index_slots`: group-major, then depth/head); every zoo
  quantizer has `(codebook_size,) * Q`.
- `decode_indices(indices) -> Tensor`: the one index-to-vector method. It takes indices
  exactly in the layout `forward` returns them ((B, N), (B, N, Q), grouped (G, B, N, Q), the
  image-map layouts when built for maps) and returns what `forward` returned as `quantized`
  in eval mode (after any project_out, in the input layout), bit for bit. It rejects any index
  outside `[0, codebook_size)` with a ValueError naming the value, the valid range and the
  quantizer; quantizers whose forward marks positions with `MASKED = -1` (VQ masks and
  non-finite tokens, FSQ / LFQ / BSQ non-finite tokens, residual stacks' dropped layers) also
  accept it, and a position holding -1 decodes to zero. LatentQuantize and SimVQ never emit
  -1 and reject it.
  The reference's own names stay as aliases with the reference's behaviour:
  `get_output_from_indices` (VQ / residual / grouped families, SimVQ) and `indices_to_codes`
  (FSQ, LFQ/BSQ, LatentQuantize, SimVQ).
- the total auxiliary loss of an output: `aux_loss(output)` (below), a float32 scalar.

`RandomProjectionQuantizer` (`rpq`) is the one index-only quantizer (`produces_quantized =
False`): its forward returns the indices tensor (B, N, Q) itself, it keeps the three size
attributes, `aux_loss` of its output is 0, and its `decode_indices` raises a TypeError (there
is no quantized output to reproduce).

This file imports nothing but torch, like the rest of `src/quantizers/`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

MASKED = -1  # index of a masked position or dropped residual layer; decodes to zero


class IndexRangeError(ValueError):
    """An index outside a quantizer's codebook was passed to a decode method."""


def check_index_range(
    indices: Tensor, codebook_size: int, owner: object, *, allow_masked: bool = False
) -> None:
    """Raise `IndexRangeError` unless every index lies in [0, codebook_size) (or is -1 when
    `allow_masked`). One min/max reduction per call (a host sync for device tensors)."""
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"{_name(owner)} indices must be an integer tensor, got {indices.dtype}")
    if indices.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(indices))
    floor = MASKED if allow_masked else 0
    if low >= floor and high < codebook_size:
        return
    bad = low if low < floor else high
    allowed = f"[0, {codebook_size})" + (" or -1 (masked / dropped)" if allow_masked else "")
    raise IndexRangeError(
        f"{_name(owner)} got index {bad}, outside its codebook: valid indices are {allowed}"
    )


def _name(owner: object) -> str:
    return owner if isinstance(owner, str) else type(owner).__name__


def aux_loss(output: Any) -> Tensor:
    """The total auxiliary loss of a quantizer output as a float32 scalar (0 when none).

    Named tuples: the sum of every field named `loss` or ending in `_loss` (each summed over
    its elements: per-layer, per-group losses add up). Plain tuples (the reference library's
    `(quantized, indices, loss, ...)`): the third element when it is a floating tensor. A bare
    tensor (an index-only quantizer's output) has no loss.
    """
    if isinstance(output, Tensor):
        return output.new_zeros((), dtype=torch.float32)
    if not isinstance(output, tuple) or not output:
        raise TypeError(
            "aux_loss expects a quantizer output: a tuple (quantized, indices[, loss, ...]) "
            f"or an index tensor, got {type(output).__name__}"
        )
    fields = getattr(output, "_fields", None)
    if fields is not None:
        losses = [
            value
            for name, value in zip(fields, output, strict=True)
            if (name == "loss" or name.endswith("_loss")) and isinstance(value, Tensor)
        ]
    else:
        third = output[2] if len(output) > 2 else None
        losses = [third] if isinstance(third, Tensor) and third.is_floating_point() else []
    if not losses:
        anchor = next((v for v in output if isinstance(v, Tensor)), None)
        device = anchor.device if anchor is not None else None
        return torch.zeros((), dtype=torch.float32, device=device)
    total = losses[0].float().sum()
    for loss in losses[1:]:
        total = total + loss.float().sum()
    return total


class QuantizerContract:
    """Mixin of the zoo's quantizers: `codebook_sizes` from `codebook_size` and
    `num_codebooks` (every slot the same size); classes define `decode_indices`."""

    codebook_size: int
    num_codebooks: int

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        """The codebook size of each of the `num_codebooks` code slots."""
        return (int(self.codebook_size),) * int(self.num_codebooks)


class ContractReport(NamedTuple):
    """What `check_contract` read from a module."""

    codebook_size: int
    num_codebooks: int
    codebook_sizes: tuple[int, ...]
    decodes: bool


def check_contract(module: nn.Module) -> ContractReport:
    """Check the contract's attributes on `module`; raise TypeError listing what is missing.

    Behaviour (decode equals forward, range errors) is checked by tests/quantizers/
    test_contract.py; this is the cheap structural part a framework can run at build time.
    """
    problems = []
    size = getattr(module, "codebook_size", None)
    count = getattr(module, "num_codebooks", None)
    sizes = getattr(module, "codebook_sizes", None)
    if not isinstance(size, int) or size < 1:
        problems.append(f"codebook_size must be a positive int, got {size!r}")
    if not isinstance(count, int) or count < 1:
        problems.append(f"num_codebooks must be a positive int, got {count!r}")
    if not isinstance(sizes, tuple) or not all(isinstance(s, int) and s > 0 for s in sizes):
        problems.append(f"codebook_sizes must be a tuple of positive ints, got {sizes!r}")
    elif isinstance(count, int) and len(sizes) != count:
        problems.append(f"codebook_sizes has {len(sizes)} entries for num_codebooks={count}")
    decode = getattr(module, "decode_indices", None)
    if not callable(decode):
        problems.append("decode_indices(indices) is missing")
    if problems:
        raise TypeError(
            f"{type(module).__name__} breaks the quantizer contract "
            f"(src/quantizers/contract.py): " + "; ".join(problems)
        )
    decodes = getattr(module, "produces_quantized", True)
    return ContractReport(size, count, sizes, bool(decodes))


class IndexLayout(NamedTuple):
    """How a quantizer lays out the indices of a (B, N, dim) sequence: `groups` leading
    groups (0 when not grouped) and whether a trailing codebook axis is present."""

    groups: int
    trailing: bool


def index_layout(quantizer: nn.Module, dim: int) -> IndexLayout:
    """The index layout of `quantizer` on (batch, seq, dim) input, read from one eval-mode
    forward of zeros (2, 3, dim) without gradients; the module's mode is restored. Works for
    any module returning `(quantized, indices, ...)` in the reference library's layouts."""
    reference = next(iter(quantizer.parameters()), next(iter(quantizer.buffers()), None))
    probe = torch.zeros(2, 3, dim, device=None if reference is None else reference.device)
    was_training = quantizer.training
    quantizer.eval()
    try:
        with torch.no_grad():
            output = quantizer(probe)
    finally:
        quantizer.train(was_training)
    indices = output if isinstance(output, Tensor) else output[1]
    if indices is None:
        raise ValueError(f"{type(quantizer).__name__} returned no indices (return_indices=False?)")
    shape = tuple(indices.shape)
    if shape == (2, 3):
        return IndexLayout(0, False)
    if len(shape) == 3 and shape[:2] == (2, 3):
        return IndexLayout(0, True)
    if len(shape) in (3, 4) and shape[1:3] == (2, 3):
        return IndexLayout(shape[0], len(shape) == 4)
    raise ValueError(
        f"cannot read the index layout of {type(quantizer).__name__}: indices of shape {shape} "
        "for (batch=2, seq=3); expected (B, N), (B, N, Q) or (G, B, N[, Q])"
    )


def index_slots(indices: Tensor, layout: IndexLayout) -> Tensor:
    """Indices in `layout` -> (B, N, Q): groups major, then the trailing axis."""
    if layout.groups:
        moved = indices.movedim(0, 2)  # (B, N, G[, q])
        return moved.reshape(*moved.shape[:3], -1).flatten(2)
    return indices if layout.trailing else indices.unsqueeze(-1)


def slots_to_indices(slots: Tensor, layout: IndexLayout) -> Tensor:
    """(B, N, Q) slots -> the quantizer's own index layout (inverse of `index_slots`)."""
    if layout.groups:
        grouped = slots.unflatten(-1, (layout.groups, -1)).movedim(2, 0)  # (G, B, N, q)
        return grouped if layout.trailing else grouped.squeeze(-1)
    return slots if layout.trailing else slots.squeeze(-1)
