"""Grok-1's small element-wise pieces: RMSNorm, the tanh soft cap, NeoX rotary embeddings.

All three compute in float32 (or wider) whatever the input dtype, so bf16 autocast does not
reach the statistics, the tanh or the rotation angles.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32, or the input's dtype when it is wider (float64 tests stay float64)."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps) * weight`; the weight is the checkpoint's `scale`."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(_wide(x.dtype))
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(xf.dtype)).to(x.dtype)


def soft_cap(x: Tensor, cap: float) -> Tensor:
    """`cap * tanh(x / cap)`; a cap <= 0 switches it off."""
    if cap <= 0:
        return x
    return cap * torch.tanh(x / cap)


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos/sin tables (T, head_dim) for NeoX rotary embeddings at integer `positions` (T,).

    Frequency i (of head_dim / 2) is theta**(-2i / head_dim); the table repeats the half so
    that dimension j and j + head_dim/2 share a frequency (the rotate-half pairing).
    """
    wide = _wide(dtype)
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=wide) / head_dim
    )
    angles = positions.to(wide)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., T, head_dim) NeoX style: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), where
    x1, x2 are the first and second halves of the head dimension."""
    xf = x.to(cos.dtype)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
