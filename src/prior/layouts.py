"""Code grids <-> token sequences for a decoder-only prior: the base class and ``flatten``.

Every layout reads the codes ``(B, *grid, Q)`` of the codes API in raster order (row-major over
the grid) and starts each sequence with one prefix token: the class token of the label, or the
null token (unconditional models, and classifier-free-guidance dropout, where it stands for "no
label"). The prefix gives the first code something to be predicted from, so every code of the
grid is a target. Sequences are exactly invertible: ``decode(encode(codes)) == codes``.

Conventions shared by all layouts (the model and the sampler rely on them):

* ``tokens[:, 0]`` is the prefix; the model reads ``tokens[:, :-1]`` and predicts
  ``tokens[:, 1:]``; ``step`` always means an index into the full sequence (1 .. L-1 for targets).
* ``vocab_size`` counts codes and special tokens; ids ``>= code_vocab_size`` are special: the
  class tokens ``code_vocab_size + c``, then ``null_token`` (then ``pad_token`` in stream
  layouts).
* ``allowed_slices(step)`` gives, per stream, the contiguous id range a token at ``step`` may take
  (its code slot's range; the pad token at a delay pattern's padded positions). A sampler's
  logits hook masks everything else (``constrain_logits``); the loss may do the same with
  ``allowed_masks()``.

``flatten`` (this file) is one stream: the ``Q`` codes of a position follow each other, slot
``q``'s codes offset by the sizes of the slots before it (one joint vocabulary, so the depths of
a residual quantizer get their own embeddings). The stream layouts (``delay``, ``factorized``)
are in :mod:`src.prior.stream_layouts`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from src.prior.code_factors import CodeFactors

__all__ = ["CodeLayout", "FlattenLayout"]


class CodeLayout(ABC):
    """Shared part of the layouts: grid, code slots (after the optional factor split), the
    class prefix and the masks built from :meth:`allowed_slices`.

    Args:
        codebook_sizes: codes per slot, one entry per slot ``q`` of the codes' last axis.
        grid: the code grid, ``(h, w)`` for images or ``(frames,)`` for audio.
        num_classes: class tokens reserved for labels ``0 .. num_classes-1``; 0 = unconditional.
        max_factor_bits: split every slot with more than ``2**max_factor_bits`` codes into bit
            groups (:class:`~src.prior.code_factors.CodeFactors`); None = never.
    """

    name: str
    #: True when tokens carry a trailing stream axis ``(B, L, S)``; False: ``(B, L)``
    multi_stream: bool

    def __init__(
        self,
        codebook_sizes: Sequence[int],
        grid: Sequence[int],
        num_classes: int = 0,
        max_factor_bits: int | None = None,
    ) -> None:
        self.grid = tuple(int(g) for g in grid)
        if not self.grid or min(self.grid) < 1:
            raise ValueError(f"grid must be a non-empty shape of sizes >= 1, got {list(grid)}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        self.num_classes = int(num_classes)
        self.factors = CodeFactors(codebook_sizes, max_factor_bits)
        self.codebook_sizes = self.factors.codebook_sizes
        # built on first use per (vocabulary width | None, device): samplers ask every step
        self._tables: dict[tuple[str, int | None, str], Tensor | tuple[Tensor, Tensor]] = {}

    # ----------------------------------------------------------------- sizes and tokens
    @property
    def num_positions(self) -> int:
        """``P``: positions of the code grid (its product)."""
        return math.prod(self.grid)

    @property
    def slot_sizes(self) -> tuple[int, ...]:
        """Vocabulary of each predicted slot: the factor sizes (the codebook sizes if unsplit)."""
        return self.factors.factor_sizes

    @property
    @abstractmethod
    def code_vocab_size(self) -> int:
        """Ids below this are codes (per stream in stream layouts); the special tokens follow."""

    @property
    def null_token(self) -> int:
        """The "no label" prefix: unconditional models and classifier-free-guidance dropout."""
        return self.code_vocab_size + self.num_classes

    @property
    def vocab_size(self) -> int:
        """Ids a token can take (codes and special tokens; per stream in stream layouts)."""
        return self.null_token + 1

    @property
    def num_streams(self) -> int:
        """Tokens per sequence step (1 for flatten)."""
        return 1

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """``L``: length of a full sequence, prefix included (the model reads ``L - 1``)."""

    def class_token(self, label: int) -> int:
        """Prefix id of class ``label``."""
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside [0, {self.num_classes}) (num_classes)")
        return self.code_vocab_size + label

    def prefix_tokens(
        self,
        labels: Tensor | None,
        batch_size: int,
        class_dropout: float = 0.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The ``(B,)`` prefix ids: class tokens of ``labels`` (``-1`` = null), or null tokens.

        ``labels=None`` is only accepted by unconditional layouts (``num_classes=0``); a
        conditional one asks for labels (pass -1 where no label is meant). ``class_dropout`` is
        the probability that a label is replaced by the null token (classifier-free guidance),
        drawn from ``generator``.
        """
        if not 0.0 <= class_dropout <= 1.0:
            raise ValueError(f"class_dropout must be in [0, 1], got {class_dropout}")
        if labels is None:
            if self.num_classes:
                raise ValueError(
                    f"this layout is class-conditional (num_classes={self.num_classes}): pass "
                    "labels (-1 for the null class), or build it with num_classes=0"
                )
            return torch.full((batch_size,), self.null_token, dtype=torch.long, device=device)
        if not self.num_classes:
            raise ValueError(
                "labels given to an unconditional layout (num_classes=0): build the layout "
                "with num_classes=<number of classes> to condition on them"
            )
        labels = torch.as_tensor(labels, device=device).long()
        if labels.shape != (batch_size,):
            raise ValueError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < -1 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}) or be -1 (null class), found "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        tokens = torch.where(labels < 0, self.null_token, self.code_vocab_size + labels)
        if class_dropout > 0:
            # drawn on the generator's device (torch requires it), compared on the labels'
            draw_device = generator.device if generator is not None else labels.device
            drop = torch.rand(batch_size, generator=generator, device=draw_device)
            tokens = torch.where(drop.to(tokens.device) < class_dropout, self.null_token, tokens)
        return tokens

    def labels_of(self, tokens: Tensor) -> Tensor:
        """The ``(B,)`` labels of full sequences (``-1`` for the null token)."""
        prefix = tokens[:, 0, 0] if self.multi_stream else tokens[:, 0]
        return torch.where(prefix == self.null_token, -1, prefix - self.code_vocab_size)

    # ----------------------------------------------------------------- codes <-> sequences
    def encode(
        self,
        codes: Tensor,
        labels: Tensor | None = None,
        class_dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Codes ``(B, *grid, Q)`` (+ labels ``(B,)``) -> full token sequences, prefix first.

        Raises ``ValueError`` for a wrong grid or slot count and for codes outside their slot's
        codebook.
        """
        expected = (*self.grid, len(self.codebook_sizes))
        if codes.dim() != len(expected) + 1 or tuple(codes.shape[1:]) != expected:
            raise ValueError(
                f"codes must have shape (B, {', '.join(map(str, expected))}) (batch, grid "
                f"{list(self.grid)}, Q={len(self.codebook_sizes)} slots), got {tuple(codes.shape)}"
            )
        factors = self.factors.split(codes).reshape(codes.shape[0], self.num_positions, -1)
        prefix = self.prefix_tokens(labels, codes.shape[0], class_dropout, generator, codes.device)
        return self._encode_factors(factors, prefix)

    def decode(self, tokens: Tensor) -> Tensor:
        """Full token sequences -> codes ``(B, *grid, Q)``; every token is checked against
        :meth:`allowed_slices` first (a clear error names the step, stream and range)."""
        self.check_tokens(tokens)
        factors = self._decode_factors(tokens)
        codes = self.factors.merge(factors)
        return codes.reshape(tokens.shape[0], *self.grid, len(self.codebook_sizes))

    @abstractmethod
    def _encode_factors(self, factors: Tensor, prefix: Tensor) -> Tensor:
        """``(B, P, S)`` factors in range and ``(B,)`` prefix ids -> full sequences."""

    @abstractmethod
    def _decode_factors(self, tokens: Tensor) -> Tensor:
        """Checked full sequences -> ``(B, P, S)`` factors."""

    # ----------------------------------------------------------------- constraints
    @abstractmethod
    def allowed_slices(self, step: int) -> tuple[slice, ...]:
        """Per stream, the id range a token at ``step`` of the full sequence may take (step 0:
        the class and null tokens; then the code slot's range, or the pad token)."""

    def allowed_mask(self, step: int, vocab_size: int | None = None) -> Tensor:
        """Boolean ``(V,)`` (flatten) or ``(S, V)`` (streams) mask of :meth:`allowed_slices`;
        ``vocab_size`` may exceed the layout's (a model with a padded vocabulary)."""
        width = self._width(vocab_size)
        mask = torch.zeros(self.num_streams, width, dtype=torch.bool)
        for s, allowed in enumerate(self.allowed_slices(step)):
            mask[s, allowed] = True
        return mask if self.multi_stream else mask[0]

    def allowed_masks(self, vocab_size: int | None = None) -> Tensor:
        """:meth:`allowed_mask` of every step, ``(L, V)`` or ``(L, S, V)``; the loss of the
        targets ``tokens[:, 1:]`` uses rows ``1:``."""
        return torch.stack([self.allowed_mask(t, vocab_size) for t in range(self.seq_len)])

    def constrain_logits(self, logits: Tensor, step: int) -> Tensor:
        """``logits`` ``(..., V)`` / ``(..., S, V)`` for the token at ``step`` with every id
        outside :meth:`allowed_slices` set to ``-inf`` (a sampler's logits hook)."""
        key = ("masks", logits.shape[-1], str(logits.device))
        if key not in self._tables:
            self._tables[key] = self.allowed_masks(logits.shape[-1]).to(logits.device)
        mask = self._tables[key][step]  # type: ignore[index]
        return logits.masked_fill(~mask, float("-inf"))

    def target_mask(self) -> Tensor:
        """Which targets ``tokens[:, 1:]`` are codes that count in the loss and the NLL:
        ``(L-1,)`` or ``(L-1, S)`` bool (False only at a delay pattern's padding)."""
        shape = (self.seq_len - 1, self.num_streams) if self.multi_stream else (self.seq_len - 1,)
        return torch.ones(shape, dtype=torch.bool)

    def check_tokens(self, tokens: Tensor) -> None:
        """Raise ``ValueError`` unless ``tokens`` are full sequences of this layout whose every
        token lies in its step's :meth:`allowed_slices`."""
        shape = (self.seq_len, self.num_streams) if self.multi_stream else (self.seq_len,)
        if tokens.dim() != len(shape) + 1 or tuple(tokens.shape[1:]) != shape:
            raise ValueError(
                f"{self.name} sequences must have shape (B, {', '.join(map(str, shape))}) "
                f"(prefix included), got {tuple(tokens.shape)}"
            )
        low, high = self._bounds(tokens.device)
        view = tokens if self.multi_stream else tokens.unsqueeze(-1)
        bad = (view < low) | (view >= high)
        if bad.any():
            b, step, s = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"token {int(view[b, step, s])} at step {step}, stream {s} (sequence {b}) is "
                f"outside the allowed ids [{int(low[step, s])}, {int(high[step, s])}) of that "
                f"step in the {self.name} layout: not a sequence of this layout or vocabulary"
            )

    def _bounds(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(L, S)`` lower and upper allowed ids of every step and stream."""
        key = ("bounds", None, str(device))
        if key not in self._tables:
            slices = [self.allowed_slices(t) for t in range(self.seq_len)]
            low = torch.tensor([[s.start for s in row] for row in slices], device=device)
            high = torch.tensor([[s.stop for s in row] for row in slices], device=device)
            self._tables[key] = (low, high)
        return self._tables[key]  # type: ignore[return-value]

    def _width(self, vocab_size: int | None) -> int:
        if vocab_size is None:
            return self.vocab_size
        if vocab_size < self.vocab_size:
            raise ValueError(
                f"the model's vocabulary ({vocab_size}) is smaller than the {self.name} "
                f"layout's ({self.vocab_size}): size the model from layout.vocab_size"
            )
        return vocab_size

    def _prefix_slice(self) -> slice:
        return slice(self.code_vocab_size, self.null_token + 1)


class FlattenLayout(CodeLayout):
    """One stream: prefix, then for each position in raster order its ``S`` slots in turn, slot
    ``s`` offset by ``sum(slot_sizes[:s])`` into one joint vocabulary. ``L = 1 + P * S``.

    With ``max_factor_bits`` the slots are bit-group factors predicted one after another
    (exact autoregression over factors, each step a small softmax).
    """

    name = "flatten"
    multi_stream = False

    def __init__(
        self,
        codebook_sizes: Sequence[int],
        grid: Sequence[int],
        num_classes: int = 0,
        max_factor_bits: int | None = None,
    ) -> None:
        super().__init__(codebook_sizes, grid, num_classes, max_factor_bits)
        sizes = self.slot_sizes
        self.slot_offsets = tuple(sum(sizes[:s]) for s in range(len(sizes)))

    @property
    def code_vocab_size(self) -> int:
        return sum(self.slot_sizes)

    @property
    def seq_len(self) -> int:
        return 1 + self.num_positions * len(self.slot_sizes)

    def slot_of_step(self, step: int) -> int:
        """The slot whose code the token at ``step >= 1`` holds."""
        if not 1 <= step < self.seq_len:
            raise ValueError(f"code steps of this layout are 1 .. {self.seq_len - 1}, got {step}")
        return (step - 1) % len(self.slot_sizes)

    def allowed_slices(self, step: int) -> tuple[slice, ...]:
        if step == 0:
            return (self._prefix_slice(),)
        slot = self.slot_of_step(step)
        start = self.slot_offsets[slot]
        return (slice(start, start + self.slot_sizes[slot]),)

    def _encode_factors(self, factors: Tensor, prefix: Tensor) -> Tensor:
        offsets = torch.tensor(self.slot_offsets, device=factors.device)
        body = (factors + offsets).reshape(factors.shape[0], -1)
        return torch.cat([prefix.unsqueeze(1), body], dim=1)

    def _decode_factors(self, tokens: Tensor) -> Tensor:
        offsets = torch.tensor(self.slot_offsets, device=tokens.device)
        body = tokens[:, 1:].reshape(tokens.shape[0], self.num_positions, len(self.slot_sizes))
        return body - offsets
