"""How much of a codebook the tokens use: utilization, perplexity and dead codes.

Counts every code per codebook over an epoch (or any window between resets). The counts are
summed over ranks before `compute`, so under DDP the values describe the global usage.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

MAX_CODEBOOK_SIZE = 2**24
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
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, codebook_size: int, num_codebooks: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if codebook_size < 1 or num_codebooks < 1:
            raise ValueError(
                f"codebook_size and num_codebooks must be >= 1; "
                f"got {codebook_size} and {num_codebooks}"
            )
        if codebook_size > MAX_CODEBOOK_SIZE:
            raise ValueError(
                f"exact per-code counts are not supported for codebook_size={codebook_size} "
                f"(at most {MAX_CODEBOOK_SIZE})"
            )
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
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
        if bool(((flat < 0) | (flat >= size))[keep].any()):
            bad = flat[keep]
            raise ValueError(
                f"indices must lie in [0, {size - 1}] (or be {IGNORE_INDEX} to skip); "
                f"got values in [{bad.min().item()}, {bad.max().item()}]"
            )
        offsets = torch.arange(num_codebooks, device=flat.device) * size
        keys = (flat + offsets)[keep]
        counts = torch.bincount(keys, minlength=num_codebooks * size)
        self.counts += counts.view(num_codebooks, size)

    def _wrap_compute(self, compute: Callable) -> Callable:
        """torchmetrics squeezes one-element results; keep per-codebook shapes for one codebook."""
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def keep_shapes(*args: Any, **kwargs: Any) -> dict[str, Tensor]:
            out = dict(wrapped(*args, **kwargs))
            for name, value in out.items():
                if name.endswith("_per_codebook"):
                    out[name] = value.reshape(self.num_codebooks)
            out["code_frequencies"] = out["code_frequencies"].reshape(
                self.num_codebooks, self.codebook_size
            )
            return out

        return keep_shapes

    def compute(self) -> dict[str, Tensor]:
        """The usage statistics of everything counted since the last reset."""
        counts = self.counts.double()
        totals = counts.sum(dim=-1, keepdim=True)
        frequencies = counts / totals.clamp_min(1)
        used = self.counts > 0
        utilization = used.double().mean(dim=-1)
        dead_codes = (~used).sum(dim=-1).double()
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
