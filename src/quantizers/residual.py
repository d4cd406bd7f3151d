"""Residual quantization over any stack of quantizer layers (SoundStream, Zeghidour et al. 2021).

Layer `i` quantizes what layers `0..i-1` left over; the output is the sum of the layer
outputs. ResidualVQ builds on this, and so can ResidualFSQ / ResidualLFQ / ResidualSimVQ.

Layer protocol (what `ResidualStack` needs from each layer):
- `layer(x, **kwargs)` takes channel-last `(batch, seq, dim)` float32 input and returns a tuple
  (a NamedTuple is fine) `(quantized, indices[, loss, ...])`: `quantized` with `x`'s shape and
  value equal to the decoded codes, `indices` int64 of shape `(batch, seq)`, and optionally a
  loss tensor of any fixed shape (VectorQuantize: (1,); LFQ: ()). Extra fields are ignored.
- `codebook_size` (indices at depth i are checked against layer i's) and a decode
  method, named by the stack's `decode` argument (default `get_output_from_indices`;
  FSQ-like layers pass `decode="indices_to_codes"`), mapping `(batch, seq)` indices in
  `[0, codebook_size)` to `(batch, seq, dim)` values equal to what forward returned in eval
  mode. The stack never hands it -1: it decodes 0 there and zeroes the result itself.
- Layers with a scale, an offset or a projection of their own wrap it inside the layer
  (e.g. a small module that divides its input by a scale and multiplies its output back).

Quantize dropout (training only): only the first `num_kept` layers run, the rest give index -1
and zero loss. `num_kept` is drawn on rank 0 and broadcast, so every rank agrees.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from src.quantizers.communicator import Communicator, Distributable
from src.quantizers.contract import check_index_range

# Makes one layer object that appears several times in the stack (a shared codebook) collect
# its state updates over the whole pass and apply them once when the context exits.
DeferUpdates = Callable[[nn.Module], AbstractContextManager[None]]
# Implicit neural codebooks (QINCo): `transform(codebook, condition=sum of the earlier
# depths' codes)` gives each token its own codebook; it reaches the layer (which must take a
# `codebook_transform_fn` keyword in forward and decode, like VectorQuantize) bound to the
# running sum. One entry per depth, None for a depth that searches its stored codebook.
CodebookTransforms = Sequence[Callable[..., Tensor] | None]


def frac_gradient(t: Tensor, frac: float) -> Tensor:
    """`t` in value, with `frac` of its gradient."""
    return frac * t + (1.0 - frac) * t.detach()


def share_communicator(module: Distributable, communicator: Communicator) -> None:
    """Set `communicator` on `module` and on every Distributable below it."""
    Distributable.set_communicator(module, communicator)
    for sub in module.modules():
        if sub is not module and isinstance(sub, Distributable):
            sub.set_communicator(communicator)


class ResidualStackOutput(NamedTuple):
    """`indices` (..., L) with -1 for dropped layers; `losses` (*loss_shape, L) or None;
    `all_codes` (L, ..., dim), each layer's output (zero where dropped), when asked for."""

    quantized: Tensor
    indices: Tensor
    losses: Tensor | None
    all_codes: Tensor | None = None


class ResidualStack(Distributable):
    """Sum of quantizer layers, each fed the residual the previous ones left.

    `layers` are distinct modules, or a single module repeated `depth` times (a shared
    codebook: stored once, so the state dict holds one copy). `defer_updates`, when given, is
    entered around the pass of a shared layer in training mode so its state (EMA, ...) takes
    one step from all depths' statistics instead of `depth` sequential steps.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        *,
        depth: int | None = None,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        decode: str = "get_output_from_indices",
        defer_updates: DeferUpdates | None = None,
        owner: str = "ResidualStack",
    ) -> None:
        super().__init__()
        if len(layers) == 0:
            raise ValueError("a residual stack needs at least one layer")
        shared = depth is not None
        if shared and len(layers) != 1:
            raise ValueError("`depth` repeats one shared layer; pass exactly one layer with it")
        self.depth = depth if shared else len(layers)
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if not 0 <= quantize_dropout_cutoff_index < self.depth:
            raise ValueError(
                f"quantize_dropout_cutoff_index must lie in [0, {self.depth}) (the last layer "
                f"always kept), got {quantize_dropout_cutoff_index}"
            )
        if quantize_dropout_multiple_of < 1:
            raise ValueError(
                f"quantize_dropout_multiple_of must be >= 1, got {quantize_dropout_multiple_of}"
            )
        for layer in layers:
            if not callable(getattr(layer, decode, None)):
                raise ValueError(f"layer {type(layer).__name__} has no decode method {decode!r}")
        self.layers = nn.ModuleList(layers)
        self.shared = shared
        self.quantize_dropout = quantize_dropout and self.depth > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.decode = decode
        self.defer_updates = defer_updates
        self.owner = owner  # named in index range errors

    def set_communicator(self, communicator: Communicator) -> None:
        """Hand the communicator to the layers too, even without `install_communicator`."""
        share_communicator(self, communicator)

    def layer(self, i: int) -> nn.Module:
        """The module quantizing depth `i`."""
        return self.layers[0] if self.shared else self.layers[i]

    # ---- quantize dropout -----------------------------------------------------------------

    def draw_num_kept(
        self, device: torch.device | str = "cpu", seed: int | None = None
    ) -> int | None:
        """How many layers run in this training step (None: all, e.g. in eval mode).

        Uniform over [cutoff + 1, depth], rounded up to a multiple of
        `quantize_dropout_multiple_of` (structured dropout, as in EnCodec) and capped at depth.
        Every rank draws (keeping RNG streams aligned) and takes rank 0's number. With a
        `seed` (the reference's `rand_quantize_dropout_fixed_seed`, the same on every rank)
        the draw is `random.Random(seed)`'s, as the reference makes it, and nothing is synced.
        """
        if not (self.training and self.quantize_dropout):
            return None
        low = self.quantize_dropout_cutoff_index + 1
        if seed is not None:
            num = random.Random(seed).randrange(low - 1, self.depth) + 1
        else:
            kept = torch.randint(low, self.depth + 1, (1,), device=device)
            kept = self.communicator.broadcast(kept, src=0)
            num = int(kept.item())
        step = self.quantize_dropout_multiple_of
        return min(self.depth, -(-num // step) * step)

    # ---- forward / decode -----------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        *,
        num_kept: int | None = None,
        return_all_codes: bool = False,
        quant_grad_frac: float = 0.0,
        codebook_transforms: CodebookTransforms | None = None,
        **layer_kwargs: object,
    ) -> ResidualStackOutput:
        """Quantize channel-last `x` (batch, seq, dim) with the first `num_kept` layers.

        `num_kept=None` draws it (training with quantize dropout) or keeps every layer.
        `layer_kwargs` (e.g. `mask`) go to every layer call. `quant_grad_frac` lets that
        fraction of a layer's output gradient flow through the next layers' residual (0: the
        next layer only fixes this one's error). The running residual and the sum are
        float32, so bf16 autocast does not erode the fine layers' small residuals.
        `codebook_transforms` (see `CodebookTransforms`) makes depth i search a per-token
        codebook conditioned on the running sum (with its gradient) of depths < i.
        """
        if num_kept is None:
            num_kept = self.draw_num_kept(x.device)
        num_kept = self.depth if num_kept is None else num_kept
        if not 1 <= num_kept <= self.depth:
            raise ValueError(f"num_kept must lie in [1, {self.depth}], got {num_kept}")
        self._check_transforms(codebook_transforms)

        residual = x.float()
        total = torch.zeros_like(residual)
        indices: list[Tensor] = []
        losses: list[Tensor] = []
        codes: list[Tensor] = []
        deferred = self.shared and self.training and self.defer_updates is not None
        context = self.defer_updates(self.layers[0]) if deferred else nullcontext()
        with context:
            for i in range(num_kept):
                kwargs = _with_transform(layer_kwargs, codebook_transforms, i, total)
                out = self.layer(i)(residual, **kwargs)
                quantized = out[0].float()
                # the next layer learns to fix this one's error, not to move its codes
                if quant_grad_frac > 0:
                    residual = residual - frac_gradient(quantized, quant_grad_frac)
                else:
                    residual = residual - quantized.detach()
                total = total + quantized
                if return_all_codes:  # the values used, even if the layer updates itself
                    codes.append(quantized)
                indices.append(out[1])
                if len(out) > 2 and out[2] is not None:
                    losses.append(out[2])
        dropped = self.depth - num_kept
        if dropped:
            indices.extend([torch.full_like(indices[0], -1)] * dropped)
            if losses:
                losses.extend([torch.zeros_like(losses[0])] * dropped)
            codes.extend([torch.zeros_like(total)] * (dropped if return_all_codes else 0))
        stacked_losses = torch.stack(losses, dim=-1) if losses else None
        all_codes = torch.stack(codes) if return_all_codes else None
        return ResidualStackOutput(total, torch.stack(indices, dim=-1), stacked_losses, all_codes)

    def _check_transforms(self, transforms: CodebookTransforms | None) -> None:
        if transforms is None:
            return
        if len(transforms) != self.depth or transforms[0] is not None:
            raise ValueError(
                f"codebook_transforms needs {self.depth} entries (one per depth), the first "
                f"None (depth 0 has no earlier codes to condition on); got {len(transforms)}"
            )

    def get_codes_from_indices(
        self, indices: Tensor, codebook_transforms: CodebookTransforms | None = None
    ) -> Tensor:
        """Per-layer outputs (depth, *indices.shape[:-1], dim); -1 entries decode to zero.

        `indices` is (..., q) with q <= depth; missing trailing layers count as dropped.
        With `codebook_transforms` (as forward's) each depth decodes against the codebook
        conditioned on the sum of the codes decoded before it, in forward's order of
        additions, so the values equal forward's.
        """
        if indices.ndim < 1 or not 1 <= indices.shape[-1] <= self.depth:
            raise ValueError(
                f"indices must be (batch, seq, q) with 1 <= q <= {self.depth}, "
                f"got shape {tuple(indices.shape)}"
            )
        sizes = [int(self.layer(i).codebook_size) for i in range(self.depth)]
        if len(set(sizes)) == 1:
            check_index_range(indices, sizes[0], self.owner, allow_masked=True)
        else:  # a codebook size per depth: check each column against its own
            for i in range(indices.shape[-1]):
                depth_owner = f"{self.owner} (depth {i})"
                check_index_range(indices[..., i], sizes[i], depth_owner, allow_masked=True)
        batch_shape = indices.shape[:-1]
        flat = indices.reshape(-1, indices.shape[-1]).long()
        if flat.shape[-1] < self.depth:
            flat = nn.functional.pad(flat, (0, self.depth - flat.shape[-1]), value=-1)
        self._check_transforms(codebook_transforms)
        codes = []
        total: Tensor | None = None  # the sum of the codes decoded so far, as forward adds
        for i in range(self.depth):
            layer_indices = flat[:, i]
            dropped = layer_indices < 0
            kwargs = (
                {} if total is None else _with_transform({}, codebook_transforms, i, total[None])
            )
            decoded = getattr(self.layer(i), self.decode)(
                layer_indices.clamp_min(0)[None], **kwargs
            )[0]
            layer_codes = decoded.float().masked_fill(dropped.unsqueeze(-1), 0.0)
            codes.append(layer_codes)
            if codebook_transforms is not None:
                total = (torch.zeros_like(layer_codes) if total is None else total) + layer_codes
        stacked = torch.stack(codes)
        return stacked.reshape(self.depth, *batch_shape, stacked.shape[-1])

    def get_output_from_indices(
        self, indices: Tensor, codebook_transforms: CodebookTransforms | None = None
    ) -> Tensor:
        """The summed output (*indices.shape[:-1], dim) that forward gives for these indices."""
        codes = self.get_codes_from_indices(indices, codebook_transforms)
        total = torch.zeros_like(codes[0])
        for layer_codes in codes:  # forward's order of additions, so eval values match exactly
            total = total + layer_codes
        return total


def _with_transform(
    layer_kwargs: dict, transforms: CodebookTransforms | None, depth: int, total: Tensor
) -> dict:
    """`layer_kwargs`, plus depth's codebook transform bound to the running sum `total`."""
    if transforms is None or transforms[depth] is None:
        return layer_kwargs
    return {**layer_kwargs, "codebook_transform_fn": partial(transforms[depth], condition=total)}
