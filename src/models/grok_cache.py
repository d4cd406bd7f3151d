"""Preallocated key/value cache for Grok decoding: only the K/V heads are stored.

One buffer pair per model, shaped (layers, batch, num_key_value_heads, max_length, head_dim),
holding keys after RoPE, so a cached step never re-rotates the past. With GQA this is
`num_attention_heads / num_key_value_heads` times smaller than caching every query head's view.
"""

from __future__ import annotations

import torch
from torch import Tensor


class GrokKVCache:
    """Keys/values of the first `length` positions of a batch of sequences, for every layer.

    A forward over T new tokens calls `update(layer, k, v)` once per layer (each writes at
    positions [length, length + T) and reads back [0, length + T)), then `advance(T)`.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    def bytes_per_token(self) -> int:
        """Bytes one position of one sequence takes: 2 * layers * kv_heads * head_dim * bytes."""
        layers, _, kv_heads, _, head_dim = self.k.shape
        return 2 * layers * kv_heads * head_dim * self.k.element_size()

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (batch, kv_heads, T, head_dim) at the next T positions of `layer`;
        return that layer's keys and values of all positions so far (views, no copy)."""
        batch, t = k.shape[0], k.shape[2]
        if batch != self.batch_size:
            raise ValueError(
                f"GrokKVCache: batch of {batch} rows fed to a cache built for "
                f"{self.batch_size}; build the cache with lm.new_cache(batch_size={batch}, ...)"
            )
        end = self.length + t
        if end > self.max_length:
            raise ValueError(
                f"GrokKVCache: {end} positions exceed max_length {self.max_length}; "
                "build the cache with a larger max_length"
            )
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        """Mark T more positions as filled (after every layer has called `update`)."""
        self.length += t
