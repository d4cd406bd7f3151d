"""How much of a codebook the tokens use: utilization, perplexity and dead codes.

Counts every code per codebook over an epoch (or any window between resets). The counts are
summed over ranks before `compute`, so under DDP the values describe the global usage.

Codebooks larger than `MAX_CODEBOOK_SIZE` (e.g. 2^32-code BSQ) are counted sparsely: only
the codes seen are stored, as (key, count) pairs, so memory grows with the distinct codes
seen in the window, not with the codebook. Under DDP the pairs of all ranks are
concatenated (`cat`) and merged in `compute`, which is the same sum of counts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

MAX_CODEBOOK_SIZE = 2**24  # largest codebook counted densely (one int64 per code)
MAX_KEY = 2**62  # sparse keys are codebook * codebook_size + index, as int64
IGNORE_INDEX = -1


class CodebookUsage(Metric):
    """Exact per-code counts of `num_codebooks` codebooks of `codebook_size` codes each.

    `update(indices)` takes int indices of shape (..., num_codebooks), or any shape with a
    single codebook; entries equal to -1 (masked or dropped tokens) are skipped.

    `compute()` returns a dict of float32 tensors. Scalars are means over codebooks:
    - `utilization`: fraction of codes used at least once;
    - `perplexity`: exp of the entropy (natural log) of the empirical code distribution;
      a codebook that saw no index at all has perplexity 0, like its utilization;
    - `dead_codes`: number of codes never used;
    plus `<name>_per_codebook` of shape (num_codebooks,) for each, and `code_frequencies`
    (num_codebooks, codebook_size), each row summing to 1 (or all 0 when nothing was seen).

    `sparse` (default: codebook_size > MAX_CODEBOOK_SIZE) stores only the codes seen; the
    statistics are the same exact values, but there is no `counts` state and `compute()`
    leaves out `code_frequencies`.

    `codebook_sizes` (one per codebook, e.g. a residual VQ with a size per depth): slot q
    takes indices in [0, codebook_sizes[q]) and its utilization and dead codes are over its
    own size; `codebook_size` is then their maximum (the width of `code_frequencies`, zero
    past a slot's size). Equal sizes (or None) count exactly as without it.
    """

    full_state_update = False
    merge_floor = 2**16  # sparse mode: pending (key, count) pairs tolerated before a merge
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self,
        codebook_size: int,
        num_codebooks: int = 1,
        sparse: bool | None = None,
        codebook_sizes: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.slot_sizes: tuple[int, ...] | None = None  # None: every slot has codebook_size
        if codebook_sizes is not None:
            sizes = tuple(int(n) for n in codebook_sizes)
            if len(sizes) != num_codebooks or min(sizes) < 1 or max(sizes) != codebook_size:
                raise ValueError(
                    f"codebook_sizes must hold num_codebooks={num_codebooks} positive sizes "
                    f"whose maximum is codebook_size={codebook_size}; got {list(sizes)}"
                )
            if len(set(sizes)) > 1:
                self.slot_sizes = sizes
        if codebook_size < 1 or num_codebooks < 1:
            raise ValueError(
                f"codebook_size and num_codebooks must be >= 1; "
                f"got {codebook_size} and {num_codebooks}"
            )
        if sparse is None:
            sparse = codebook_size > MAX_CODEBOOK_SIZE
        if not sparse and codebook_size > MAX_CODEBOOK_SIZE:
            raise ValueError(
                f"exact per-code counts are not supported for codebook_size={codebook_size} "
                f"(at most {MAX_CODEBOOK_SIZE}); use sparse=True"
            )
        if codebook_size * num_codebooks > MAX_KEY:
            raise ValueError(
                f"{num_codebooks} codebooks of {codebook_size} codes exceed int64 keys"
            )
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.sparse = sparse
        if sparse:
            self.add_state("seen_keys", default=[], dist_reduce_fx="cat")
            self.add_state("seen_counts", default=[], dist_reduce_fx="cat")
            return
        self.add_state(
            "counts",
            default=torch.zeros(num_codebooks, codebook_size, dtype=torch.int64),
            dist_reduce_fx="sum",
        )

    def update(self, indices: Tensor) -> None:
        """Count `indices`; one bincount over `codebook * codebook_size + index`."""
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor; got {indices.dtype}")
        num_codebooks, size = self.num_codebooks, self.codebook_size
        if num_codebooks > 1 and (indices.ndim == 0 or indices.shape[-1] != num_codebooks):
            raise ValueError(
                f"indices must have shape (..., num_codebooks={num_codebooks}); "
                f"got {tuple(indices.shape)}"
            )
        flat = indices.reshape(-1, num_codebooks).long()
        keep = flat != IGNORE_INDEX
        if self.slot_sizes is not None:
            self._check_slots(flat, keep)
        if bool(((flat < 0) | (flat >= size))[keep].any()):
            bad = flat[keep]
            raise ValueError(
                f"indices must lie in [0, {size - 1}] (or be {IGNORE_INDEX} to skip); "
                f"got values in [{bad.min().item()}, {bad.max().item()}]"
            )
        offsets = torch.arange(num_codebooks, device=flat.device) * size
        keys = (flat + offsets)[keep]
        if self.sparse:
            self._add_sparse(keys)
            return
        counts = torch.bincount(keys, minlength=num_codebooks * size)
        self.counts += counts.view(num_codebooks, size)

    def _check_slots(self, flat: Tensor, keep: Tensor) -> None:
        """Each slot's indices against its own size (codebook_sizes)."""
        limits = torch.tensor(self.slot_sizes, device=flat.device)
        outside = ((flat < 0) | (flat >= limits)) & keep
        if bool(outside.any()):
            slot = int(outside.any(dim=0).nonzero()[0, 0])
            column = flat[:, slot][keep[:, slot]]
            raise ValueError(
                f"indices of codebook {slot} must lie in [0, {self.slot_sizes[slot] - 1}] (or "
                f"be {IGNORE_INDEX} to skip); got values in [{column.min().item()}, "
                f"{column.max().item()}] (codebook sizes {list(self.slot_sizes)})"
            )

    def _slot_sizes(self, device: torch.device) -> Tensor | int:
        """Each codebook's size as a float64 (Q,) tensor, or the common int size."""
        if self.slot_sizes is None:
            return self.codebook_size
        return torch.tensor(self.slot_sizes, dtype=torch.float64, device=device)

    def _add_sparse(self, keys: Tensor) -> None:
        """Append this batch's (key, count) pairs; merge once the pending pairs outnumber the
        merged ones, so sorting costs O(n log n) amortised over the window."""
        unique, counts = torch.unique(keys, return_counts=True)
        self.seen_keys.append(unique)
        self.seen_counts.append(counts)
        pending = sum(k.numel() for k in self.seen_keys[1:])
        if len(self.seen_keys) > 1 and pending >= max(self.seen_keys[0].numel(), self.merge_floor):
            merged_keys, merged_counts = _merge_pairs(self.seen_keys, self.seen_counts)
            self.seen_keys = [merged_keys]
            self.seen_counts = [merged_counts]

    def _wrap_compute(self, compute: Callable) -> Callable:
        """torchmetrics squeezes one-element results; keep per-codebook shapes for one codebook."""
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def keep_shapes(*args: Any, **kwargs: Any) -> dict[str, Tensor]:
            out = dict(wrapped(*args, **kwargs))
            for name, value in out.items():
                if name.endswith("_per_codebook"):
                    out[name] = value.reshape(self.num_codebooks)
            if "code_frequencies" in out:
                out["code_frequencies"] = out["code_frequencies"].reshape(
                    self.num_codebooks, self.codebook_size
                )
            return out

        return keep_shapes

    def compute(self) -> dict[str, Tensor]:
        """The usage statistics of everything counted since the last reset."""
        if self.sparse:
            return self._compute_sparse()
        counts = self.counts.double()
        totals = counts.sum(dim=-1, keepdim=True)
        frequencies = counts / totals.clamp_min(1)
        used = self.counts > 0
        if self.slot_sizes is None:
            utilization = used.double().mean(dim=-1)
            dead_codes = (~used).sum(dim=-1).double()
        else:  # codes past a slot's size are never counted
            sizes = self._slot_sizes(counts.device)
            utilization = used.sum(dim=-1).double() / sizes
            dead_codes = sizes - used.sum(dim=-1).double()
        entropy = -torch.special.xlogy(frequencies, frequencies).sum(dim=-1)  # 0·log0 = 0
        perplexity = torch.where(totals.squeeze(-1) > 0, entropy.exp(), 0.0)
        per_codebook = {
            "utilization": utilization,
            "perplexity": perplexity,
            "dead_codes": dead_codes,
        }
        out = {name: value.mean().float() for name, value in per_codebook.items()}
        out |= {f"{name}_per_codebook": value.float() for name, value in per_codebook.items()}
        out["code_frequencies"] = frequencies.float()
        return out

    def _compute_sparse(self) -> dict[str, Tensor]:
        keys, counts = _merge_pairs(self.seen_keys, self.seen_counts)
        size, num_codebooks = self.codebook_size, self.num_codebooks
        codebook = keys // size
        used = torch.bincount(codebook, minlength=num_codebooks).double()
        totals = torch.zeros(num_codebooks, dtype=torch.float64, device=keys.device)
        totals.index_add_(0, codebook, counts.double())
        frequencies = counts.double() / totals[codebook].clamp_min(1)
        entropy = torch.zeros_like(totals).index_add_(
            0, codebook, -torch.special.xlogy(frequencies, frequencies)
        )
        sizes = self._slot_sizes(keys.device)
        per_codebook = {
            "utilization": used / sizes,
            "perplexity": torch.where(totals > 0, entropy.exp(), 0.0),
            "dead_codes": sizes - used,
        }
        out = {name: value.mean().float() for name, value in per_codebook.items()}
        out |= {f"{name}_per_codebook": value.float() for name, value in per_codebook.items()}
        return out


def _merge_pairs(
    keys: list[Tensor] | Tensor, counts: list[Tensor] | Tensor
) -> tuple[Tensor, Tensor]:
    """Distinct keys and their summed counts (works on a list of pairs or on synced tensors)."""
    if isinstance(keys, list) and not keys:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    all_keys, all_counts = dim_zero_cat(keys), dim_zero_cat(counts)
    unique, inverse = torch.unique(all_keys, return_inverse=True)
    summed = torch.zeros_like(unique).index_add_(0, inverse, all_counts)
    return unique, summed
