"""The codes API of a trained tokenizer: media -> integer codes -> media, outside training.

`CodesAPI` is a mixin of `ImageTokenizer` and `AudioTokenizer`. Codes are a LongTensor
`(B, *grid, Q)`: `grid` is `(h, w)` for images and `(frames,)` for audio, and the trailing
axis holds the `Q = num_codebooks` codes of a position (residual depth x groups x heads, in
the order of `codebook_sizes`; group-major for grouped quantizers). Slot `q` holds indices in
`[0, codebook_sizes[q])`.

A multi-scale tokenizer (quantizer=hierarchical_vq) has one slot per scale (level): slot `k` of
a position holds the code of the level-`k` cell it falls in. `code_scales(grid)` names those
cells, `codes_per_scale(codes)` gives each level's codes `(B, *scale_k)` (what a next-scale
prior predicts, src/prior/next_scale_layout.py) and `codes_from_scales` turns them back.

Encoding and decoding always run as in eval mode and without gradients, whatever the module's
mode (a tokenizer held inside another model that is training stays frozen and deterministic);
each submodule's mode is restored afterwards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from src.prior.scales import codes_to_scales, scales_to_codes
from src.quantizers import IndexLayout, index_layout, slots_to_indices


class CodesError(ValueError):
    """Codes passed to `decode_codes` that this tokenizer cannot decode."""


class CodesAPI:
    """Mixin: `encode_codes`, `decode_codes`, `code_grid`, `codebook_sizes`, `fingerprint`.

    The host class provides `quantizer`, `num_codebooks`, `hparams.latent_dim`,
    `encode(x) -> QuantizedLatents` and `decode(latents)`, and defines `modality`,
    `code_grid(input_shape)` and, if its output needs it, `finish_decoded(media)`.
    """

    modality: str  # "image" or "audio": what the codes stand for
    grid_ndim: int  # number of grid axes: 2 for images, 1 for audio

    # ---- what a downstream model needs -----------------------------------------------------

    def code_grid(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The code grid of an input of this shape (only its trailing axes are read)."""
        raise NotImplementedError

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        """The codebook size of each of the Q code slots."""
        return tuple(int(s) for s in self.quantizer.codebook_sizes)

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the model class, its constructor config (`hparams`, as sorted JSON)
        and every weight and buffer of the state dict except torchmetrics states, each as
        name, dtype, shape and raw bytes. Independent of the device (map_location), the
        process and the module's mode; it changes when any weight or config value does."""
        digest = hashlib.sha256()
        cls = type(self)
        digest.update(f"{cls.__module__}.{cls.__qualname__}\n".encode())
        digest.update(json.dumps(_plain(dict(self.hparams)), sort_keys=True).encode())
        skipped = tuple(
            f"{name}." for name, module in self.named_modules() if isinstance(module, Metric)
        )
        state = self.state_dict()
        for key in sorted(state):
            if key.startswith(skipped):
                continue
            tensor = state[key].detach().to("cpu").contiguous()
            digest.update(f"\n{key}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def code_scales(self, grid: Sequence[int]) -> list[list[int]] | None:
        """A multi-scale quantizer's cells per level for codes on `grid`: `[n]` = n cells along
        the positions in raster order (the quantizer sees the latent map as a sequence; each
        level capped at the positions, as its slots are). None for other quantizers."""
        shapes = getattr(self.quantizer, "level_shapes", None)
        if shapes is None:
            return None
        if getattr(self.quantizer, "spatial_dims", 1) != 1:
            raise ValueError("a tokenizer hands its quantizer a sequence: scales must be 1-d")
        positions = 1
        for size in grid:
            positions *= int(size)
        return [[min(int(shape[0]), positions)] for shape in shapes]

    def codes_per_scale(self, codes: Tensor) -> tuple[Tensor, ...]:
        """Codes (B, *grid, Q) of a multi-scale tokenizer -> each level's codes (B, *scale_k),
        coarse to fine."""
        return codes_to_scales(codes, self._scales_of(tuple(codes.shape[1:-1])))

    def codes_from_scales(self, levels: Sequence[Tensor], grid: Sequence[int]) -> Tensor:
        """Inverse of `codes_per_scale`: per-level codes -> codes (B, *grid, Q)."""
        return scales_to_codes(levels, self._scales_of(tuple(grid)), grid)

    def _scales_of(self, grid: tuple[int, ...]) -> list[list[int]]:
        scales = self.code_scales(grid)
        if scales is None:
            raise ValueError(
                f"{type(self.quantizer).__name__} is not a multi-scale quantizer: its codes have "
                "no scales (quantizer=hierarchical_vq has them)"
            )
        return scales

    # ---- encode / decode -------------------------------------------------------------------

    def encode_codes(self, x: Tensor) -> Tensor:
        """Media -> LongTensor codes (B, *grid, Q), computed as in eval mode."""
        with self.eval_no_grad():
            quantized = self.encode(x)
        if quantized.indices is None:
            raise ValueError(
                f"{type(self.quantizer).__name__} was built without indices (return_indices="
                "False?); the codes API needs a quantizer that returns them"
            )
        grid = tuple(quantized.latents.shape[2:])
        return quantized.indices.long().reshape(x.shape[0], *grid, self.num_codebooks)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Codes (B, *grid, Q) -> media: images in [0, 1] (the decoder output clamped, equal to
        `tok(x)[0].clamp(0, 1)` exactly), or waveforms (B, 1, frames * hop), equal to
        `tok(x)[0]` exactly when T is a multiple of the hop (else its first T samples)."""
        with self.eval_no_grad():
            return self.finish_decoded(self.decode(self.codes_to_latents(codes)))

    def codes_to_latents(self, codes: Tensor) -> Tensor:
        """Codes (B, *grid, Q) -> the quantized latent map (B, C, *grid) the decoder takes,
        equal to the quantizer output of the forward pass (eval mode)."""
        self.check_codes(codes)
        batch, *grid, q = codes.shape
        slots = codes.to(self.device, torch.long).reshape(batch, -1, q)
        with self.eval_no_grad():
            vectors = self.quantizer.decode_indices(slots_to_indices(slots, self.index_layout))
        return vectors.reshape(batch, *grid, -1).movedim(-1, 1)

    def finish_decoded(self, media: Tensor) -> Tensor:
        """The decoder output as `decode_codes` returns it (identity unless overridden)."""
        return media

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """`trainer.predict` tokenizes: the codes (B, *grid, Q) of the batch's media."""
        media = batch[0] if isinstance(batch, list | tuple) else batch
        return self.encode_codes(media)

    # ---- checks and helpers ------------------------------------------------------------------

    def check_codes(self, codes: Tensor) -> None:
        """Raise CodesError (TypeError for a wrong dtype) naming what is wrong with `codes`."""
        q = self.num_codebooks
        expected = f"(batch, {', '.join(self.grid_names())}, Q={q})"
        if not isinstance(codes, Tensor):
            raise TypeError(f"codes must be a torch.Tensor {expected}, got {type(codes).__name__}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.ndim != self.grid_ndim + 2 or codes.shape[-1] != q or 0 in codes.shape[:-1]:
            raise CodesError(
                f"codes must be shaped {expected} for this {self.modality} tokenizer, got "
                f"{tuple(codes.shape)}"
            )
        flat = codes.reshape(-1, q)
        low, high = flat.amin(0).tolist(), flat.amax(0).tolist()
        for slot, (lo, hi, size) in enumerate(zip(low, high, self.codebook_sizes, strict=True)):
            if lo < 0 or hi >= size:
                raise CodesError(
                    f"code slot {slot} holds {lo if lo < 0 else hi}, outside its codebook "
                    f"[0, {size}); slot sizes are {list(self.codebook_sizes)}"
                )

    def grid_names(self) -> tuple[str, ...]:
        return ("height", "width") if self.grid_ndim == 2 else ("frames",)

    @property
    def index_layout(self) -> IndexLayout:
        """How the quantizer lays out its indices (read once from an eval forward of zeros)."""
        layout = self.__dict__.get("_index_layout")
        if layout is None:
            layout = index_layout(self.quantizer, int(self.hparams.latent_dim))
            self.__dict__["_index_layout"] = layout
        return layout

    @contextmanager
    def eval_no_grad(self) -> Iterator[None]:
        """Eval mode and no gradients inside the block; every submodule's mode restored."""
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module, training in modes:
                module.training = training


def _plain(value: Any) -> Any:
    """Config values as JSON-able plain types (tuples as lists, others by repr)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Sequence):  # lists, tuples, OmegaConf ListConfig
        return [_plain(v) for v in value]
    items = getattr(value, "items", None)
    if callable(items):  # OmegaConf containers and other mappings
        return {str(k): _plain(v) for k, v in items()}
    return repr(value)
