"""Parallel-stream layouts: MusicGen's ``delay`` pattern and Open-MAGVIT2-style ``factorized``.

Tokens are ``(B, L, S)``: at each step the model reads ``S`` tokens (one per stream, their
embeddings summed) and predicts ``S`` tokens with ``S`` output heads over a per-stream
vocabulary of ``vocab_size`` ids. Stream ``s`` is shifted right by ``delays[s]`` steps and the
positions it does not cover are the pad token, so ``L = 1 + P + max(delays)``.

* ``delay`` (MusicGen, Copet et al. 2023): stream ``q`` is code slot ``q`` shifted by ``q``;
  a depth-``q`` code is predicted after the depth ``< q`` codes of its position.
* ``factorized`` (Open-MAGVIT2, Luo et al. 2024): each code is split into bit-group factors
  (``max_factor_bits``, default 9: a 2^18 codebook becomes two 2^9-way heads), all predicted at
  the same step with separate heads, so no ``2^18``-way softmax is ever formed.

With ``max_factor_bits`` on ``delay``, the factors of one slot share that slot's delay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from src.prior.layouts import CodeLayout

__all__ = ["DelayLayout", "FactorizedLayout", "StreamLayout"]


class StreamLayout(CodeLayout):
    """Streams = the (factor) slots, stream ``s`` delayed by ``delays[s]`` steps.

    Per stream, ids ``[0, slot_sizes[s])`` are codes (every stream shares the id space
    ``[0, code_vocab_size)`` with ``code_vocab_size = max(slot_sizes)``; a stream's heads simply
    never allow ids past its own size), then the class tokens, ``null_token`` and ``pad_token``.
    """

    multi_stream = True

    def __init__(
        self,
        codebook_sizes: Sequence[int],
        grid: Sequence[int],
        num_classes: int = 0,
        max_factor_bits: int | None = None,
        delays: Sequence[int] | None = None,
    ) -> None:
        super().__init__(codebook_sizes, grid, num_classes, max_factor_bits)
        streams = len(self.slot_sizes)
        self.delays = tuple(int(d) for d in delays) if delays is not None else (0,) * streams
        if len(self.delays) != streams or min(self.delays) < 0:
            raise ValueError(
                f"delays must give one delay >= 0 per stream ({streams}), got {list(self.delays)}"
            )

    @property
    def code_vocab_size(self) -> int:
        return max(self.slot_sizes)

    @property
    def pad_token(self) -> int:
        """Fills the steps a delayed stream does not cover; never a loss target."""
        return self.null_token + 1

    @property
    def vocab_size(self) -> int:
        return self.pad_token + 1

    @property
    def num_streams(self) -> int:
        return len(self.slot_sizes)

    @property
    def shifted_len(self) -> int:
        """``T' = P + max(delays)``: steps after the prefix."""
        return self.num_positions + max(self.delays)

    @property
    def seq_len(self) -> int:
        return 1 + self.shifted_len

    def shift(self, values: Tensor, fill: int | float | None = None) -> Tensor:
        """``(B, P, S)`` per-position values -> ``(B, T', S)`` with stream ``s`` moved
        ``delays[s]`` steps later and ``fill`` (default ``pad_token``) where it has none."""
        if values.dim() != 3 or tuple(values.shape[1:]) != (self.num_positions, self.num_streams):
            raise ValueError(
                f"shift expects (B, {self.num_positions}, {self.num_streams}), got "
                f"{tuple(values.shape)}"
            )
        fill = self.pad_token if fill is None else fill
        out = values.new_full((values.shape[0], self.shifted_len, self.num_streams), fill)
        for s, d in enumerate(self.delays):
            out[:, d : d + self.num_positions, s] = values[:, :, s]
        return out

    def unshift(self, shifted: Tensor) -> Tensor:
        """Inverse of :meth:`shift`: ``(B, T', S)`` -> ``(B, P, S)``."""
        if shifted.dim() != 3 or tuple(shifted.shape[1:]) != (self.shifted_len, self.num_streams):
            raise ValueError(
                f"unshift expects (B, {self.shifted_len}, {self.num_streams}), got "
                f"{tuple(shifted.shape)}"
            )
        columns = [shifted[:, d : d + self.num_positions, s] for s, d in enumerate(self.delays)]
        return torch.stack(columns, dim=-1)

    def valid_mask(self) -> Tensor:
        """``(T', S)`` bool: True where a shifted step holds a code (not padding)."""
        t = torch.arange(self.shifted_len).unsqueeze(1)
        d = torch.tensor(self.delays).unsqueeze(0)
        return (t >= d) & (t < d + self.num_positions)

    def target_mask(self) -> Tensor:
        return self.valid_mask()

    def allowed_slices(self, step: int) -> tuple[slice, ...]:
        if step == 0:
            return (self._prefix_slice(),) * self.num_streams
        if not 1 <= step < self.seq_len:
            raise ValueError(f"steps of this layout are 0 .. {self.seq_len - 1}, got {step}")
        t, pad = step - 1, slice(self.pad_token, self.pad_token + 1)
        return tuple(
            slice(0, size) if d <= t < d + self.num_positions else pad
            for size, d in zip(self.slot_sizes, self.delays, strict=True)
        )

    def _encode_factors(self, factors: Tensor, prefix: Tensor) -> Tensor:
        first = prefix.view(-1, 1, 1).expand(-1, 1, self.num_streams)
        return torch.cat([first, self.shift(factors)], dim=1)

    def _decode_factors(self, tokens: Tensor) -> Tensor:
        return self.unshift(tokens[:, 1:])


class DelayLayout(StreamLayout):
    """MusicGen's delay pattern: stream of slot ``q`` shifted by ``q`` steps."""

    name = "delay"

    def __init__(
        self,
        codebook_sizes: Sequence[int],
        grid: Sequence[int],
        num_classes: int = 0,
        max_factor_bits: int | None = None,
    ) -> None:
        super().__init__(codebook_sizes, grid, num_classes, max_factor_bits)
        # factors of one slot share its delay
        self.delays = tuple(self.factors.slot_of_factor)


class FactorizedLayout(StreamLayout):
    """Open-MAGVIT2's factorized codes: each code's bit groups as parallel streams, no delay."""

    name = "factorized"

    def __init__(
        self,
        codebook_sizes: Sequence[int],
        grid: Sequence[int],
        num_classes: int = 0,
        max_factor_bits: int | None = 9,
    ) -> None:
        super().__init__(codebook_sizes, grid, num_classes, max_factor_bits)
