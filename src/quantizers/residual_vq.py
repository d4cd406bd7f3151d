"""Residual VQ (SoundStream, Zeghidour et al. 2021), its shared-codebook RQ-VAE form (Lee et al.
2022) and grouped residual VQ (HiFi-Codec, Yang et al. 2023), over `VectorQuantize` layers.

The generic machinery lives in `residual.py` (the stack) and `grouped.py` (the groups); this
file only builds VectorQuantize layers, projects in and out once, and handles input layouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from src.quantizers.beam_search import BeamResult, beam_search, path_inputs
from src.quantizers.grouped import GroupedResidual
from src.quantizers.implicit_codebook import CodebookMLP
from src.quantizers.registry import register_quantizer
from src.quantizers.residual import CodebookTransforms, ResidualStackOutput
from src.quantizers.residual_quantizer import ResidualQuantizer
from src.quantizers.vector_quantize import VectorQuantize
from src.quantizers.vq_options import directional_reparam

DIVEQ_VARIANCE = 5e-3  # the reference's noise on the DiVeQ direction


class ResidualVQOutput(NamedTuple):
    """quantized (input layout), indices (..., Q) with -1 for dropped layers, loss (1, Q)
    ((Q,) from a beam search, as the reference returns it there)."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor


class ResidualVQCodesOutput(NamedTuple):
    """As ResidualVQOutput plus the codes each depth used (Q, ..., codebook_dim), zero where
    dropped; they carry the estimator's gradient, like `quantized`."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    all_codes: Tensor


@register_quantizer("rvq")
class ResidualVQ(ResidualQuantizer):
    """`num_quantizers` VectorQuantize layers on successive residuals, with the guide's API.

    Input `(batch, seq, dim)`, or with `accept_image_fmap=True` channel-first
    `(batch, dim, height, width)` / `(batch, dim, time, height, width)`. When `codebook_dim`
    differs from `dim` the input is projected once into codebook space and the sum projected
    back. Other keywords (decay, kmeans_init, use_cosine_sim, stochastic sampling, ...) go to
    every VectorQuantize layer; `shared_codebook=True` uses one layer at every depth.

    The reference's newer keywords: `beam_size` (training) / `eval_beam_size` (eval, default
    `beam_size`) search the depths with a beam (`beam_search.py`), scoring depth i's
    commitment loss by `beam_score_quantizer_weights[i]`; `quant_grad_frac` lets that
    fraction of each depth's gradient reach the later depths through the residual;
    `diveq=True` learns the codebooks by gradient through a directional reparameterisation
    of the summed codes (DiVeQ) instead of EMA, with zero per-depth losses;
    `return_zeros_for_masked_padding=False` passes masked positions through unchanged.
    `heads` must be 1, as in the reference.

    `codebook_size` may be a sequence, one size per depth (`num_quantizers` then defaults to
    its length; TIGER-style semantic IDs): `codebook_sizes` reports each depth's size and
    `codebook_size` the largest. `implicit_neural_codebook=True` (QINCo, Huijben et al.
    2024): every depth after the first searches a per-token codebook, its stored codes
    through a `CodebookMLP` (`mlp_kwargs`: `dim_hidden`, `depth`, `l2norm_output`)
    conditioned on the sum of the earlier depths' codes; as in the reference the codebooks
    are then learned by gradient (`learnable_codebook=True, ema_update=False`).
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int | None = None,
        codebook_size: int | Sequence[int],
        codebook_dim: int | None = None,
        shared_codebook: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        accept_image_fmap: bool = False,
        heads: int = 1,
        diveq: bool = False,
        implicit_neural_codebook: bool = False,
        mlp_kwargs: dict | None = None,
        beam_size: int | None = None,
        eval_beam_size: int | None = None,
        beam_score_quantizer_weights: list[float] | None = None,
        quant_grad_frac: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        **vq_kwargs: Any,
    ) -> None:
        super().__init__()
        if heads != 1:
            raise ValueError(f"ResidualVQ takes heads=1 only (as the reference), got {heads}")
        sizes = _depth_codebook_sizes(codebook_size, num_quantizers)
        num_quantizers = len(sizes)
        if shared_codebook and len(set(sizes)) != 1:
            raise ValueError(
                f"shared_codebook=True needs one codebook size for every depth, got {sizes}"
            )
        if mlp_kwargs and not implicit_neural_codebook:
            raise ValueError("mlp_kwargs configures implicit_neural_codebook=True; pass both")
        if implicit_neural_codebook and (beam_size or 1) * (eval_beam_size or 1) > 1:
            raise ValueError(
                "implicit_neural_codebook=True does not combine with beam search here (each "
                "beam would need its own per-token codebooks); leave beam_size unset"
            )
        if eval_beam_size is not None and beam_size is None:
            raise ValueError("eval_beam_size needs beam_size (the training beam) as well")
        for name, size in (("beam_size", beam_size), ("eval_beam_size", eval_beam_size)):
            if size is not None and size < 1:
                raise ValueError(f"{name} must be >= 1, got {size}")
        if not 0.0 <= quant_grad_frac <= 1.0:
            raise ValueError(f"quant_grad_frac must lie in [0, 1], got {quant_grad_frac}")
        weights = [1.0] * num_quantizers
        if beam_score_quantizer_weights is not None:
            weights = [float(w) for w in beam_score_quantizer_weights]
            if len(weights) != num_quantizers:
                raise ValueError(
                    f"beam_score_quantizer_weights needs {num_quantizers} weights (one per "
                    f"depth), got {len(weights)}"
                )
        self.beam_size = beam_size
        self.eval_beam_size = beam_size if eval_beam_size is None else eval_beam_size
        self.beam_score_quantizer_weights = weights
        self.diveq = diveq
        self.quant_grad_frac = 1.0 if diveq else quant_grad_frac
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        vq_kwargs["return_zeros_for_masked_padding"] = return_zeros_for_masked_padding
        if implicit_neural_codebook:  # the MLPs and codebooks learn by gradient (reference)
            vq_kwargs.update(learnable_codebook=True, ema_update=False)
        if diveq:  # codebooks learn through the reparameterised sum, not EMA or their losses
            vq_kwargs.update(
                ema_update=False,
                learnable_codebook=True,
                route_gradients_to_input=False,
                commitment_weight=0.0,
            )
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.shared_codebook = shared_codebook
        self.accept_image_fmap = accept_image_fmap
        self.channel_first = accept_image_fmap
        self.init_projections(dim, codebook_dim)

        def make_layer(size: int) -> VectorQuantize:
            return VectorQuantize(
                dim=codebook_dim, codebook_size=size, codebook_dim=codebook_dim, **vq_kwargs
            )

        self.init_stack(
            [make_layer(sizes[0])] if shared_codebook else [make_layer(n) for n in sizes],
            depth=num_quantizers if shared_codebook else None,
            quantize_dropout=quantize_dropout,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
            decode="get_output_from_indices",
            defer_updates=VectorQuantize.pooled_updates if shared_codebook else None,
        )
        self.implicit_neural_codebook = implicit_neural_codebook
        if implicit_neural_codebook:  # one MLP per depth after the first (reference: `mlps`)
            mlp_kwargs = {"l2norm_output": self.stack.layer(0).use_cosine_sim, **(mlp_kwargs or {})}
            self.mlps = nn.ModuleList(
                CodebookMLP(codebook_dim, **mlp_kwargs) for _ in range(num_quantizers - 1)
            )

    def codebook_transforms(self) -> CodebookTransforms | None:
        """[None, mlp_1, ..., mlp_{Q-1}] with implicit neural codebooks, else None."""
        if not self.implicit_neural_codebook:
            return None
        return [None, *self.mlps]

    @property
    def codebooks(self) -> Tensor | tuple[Tensor, ...]:
        """(num_quantizers, codebook_size, codebook_dim) float32 codebooks, one per depth (a
        tuple of (size_i, codebook_dim) when the depths' sizes differ, as the reference).
        With implicit neural codebooks these are the stored codes before the MLPs."""
        books = [layer.codebook for layer in self.layers]
        return torch.stack(books) if len(set(self.codebook_sizes)) == 1 else tuple(books)

    # ---- layout ---------------------------------------------------------------------------

    def _to_tokens(self, x: Tensor) -> Tensor:
        """Input layout -> (batch, tokens, dim), validating rank and feature size."""
        if self.accept_image_fmap:
            if x.ndim not in (4, 5) or x.shape[1] != self.dim:
                raise ValueError(
                    f"{type(self).__name__}(accept_image_fmap=True) expects (batch, "
                    f"dim={self.dim}, height, width) or (batch, dim, time, height, width) "
                    f"input, got shape {tuple(x.shape)}"
                )
            return x.movedim(1, -1).reshape(x.shape[0], -1, self.dim)
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects (batch, seq, dim={self.dim}) input, got shape "
                f"{tuple(x.shape)}; pass accept_image_fmap=True for (batch, dim, height, width)"
            )
        return x

    def _token_shape(self, x: Tensor) -> tuple[int, ...]:
        """Shape of one index per token position: (batch, seq) or (batch, [time,] h, w)."""
        return (x.shape[0], *x.shape[2:]) if self.accept_image_fmap else tuple(x.shape[:2])

    def _from_tokens(self, tokens: Tensor, token_shape: tuple[int, ...]) -> Tensor:
        out = tokens.reshape(*token_shape, tokens.shape[-1])
        return out.movedim(-1, 1) if self.accept_image_fmap else out

    # ---- forward / decode -----------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_all_codes: bool = False,
        *,
        indices: Tensor | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        beam_size: int | None = None,
        rand_quantize_dropout_fixed_seed: int | None = None,
        num_kept: int | None = None,
        **layer_kwargs: Any,
    ) -> ResidualVQOutput | ResidualVQCodesOutput | tuple[Tensor, Tensor]:
        """Quantize `x`; `mask` (True = valid) has the indices' shape without the Q axis.

        `num_kept` forces the quantize-dropout depth (GroupedResidualVQ uses it so all groups
        agree), `rand_quantize_dropout_fixed_seed` draws it from that seed as the reference
        does; `beam_size` overrides the constructor's beam for this call;
        `sample_codebook_temp`, `freeze_codebook` and other keywords go to every
        VectorQuantize call. With `indices` (..., Q) (codes from an eval-mode pass) it returns
        (quantized, summed cross-entropy of each depth's code logits against them).
        """
        token_shape = self._token_shape(x)
        tokens = self._to_tokens(x)
        if mask is not None:
            if tuple(mask.shape) != token_shape:
                raise ValueError(
                    f"mask must have shape {token_shape} (True = valid), got {tuple(mask.shape)}"
                )
            layer_kwargs["mask"] = mask.reshape(tokens.shape[0], -1).bool()
        if sample_codebook_temp is not None:
            layer_kwargs["sample_codebook_temp"] = sample_codebook_temp
        if freeze_codebook is not None:
            layer_kwargs["freeze_codebook"] = freeze_codebook
        projected = self.project_latents(tokens)
        if indices is not None:
            return self._cross_entropy(x, projected, indices, token_shape, layer_kwargs)
        if num_kept is None and rand_quantize_dropout_fixed_seed is not None:
            num_kept = self.draw_num_kept(x.device, rand_quantize_dropout_fixed_seed)
        beam = beam_size
        if beam is None:
            beam = self.beam_size if self.training else self.eval_beam_size
        if beam is not None and beam > 1:
            if self.implicit_neural_codebook:
                raise ValueError(
                    "implicit_neural_codebook=True does not combine with beam_size > 1"
                )
            stacked = self._beam(projected, beam, num_kept, return_all_codes, layer_kwargs)
        else:
            stacked = self.stack(
                projected,
                num_kept=num_kept,
                return_all_codes=return_all_codes,
                quant_grad_frac=self.quant_grad_frac,
                codebook_transforms=self.codebook_transforms(),
                **layer_kwargs,
            )
        total = stacked.quantized
        if self.diveq and self.training:
            total = directional_reparam(projected.float(), total, DIVEQ_VARIANCE)
        out = self._output(total, x)
        if mask is not None:
            keep = layer_kwargs["mask"].unsqueeze(-1)
            fill = 0.0 if self.return_zeros_for_masked_padding else tokens.to(out.dtype)
            out = torch.where(keep, out, fill)
        quantized = self._from_tokens(out, token_shape)
        indices = stacked.indices.reshape(*token_shape, self.num_quantizers)
        loss = stacked.losses
        if self.diveq:  # the codebooks learn through the reparameterised sum only
            loss = torch.zeros_like(loss)
        if not return_all_codes:
            return ResidualVQOutput(quantized, indices, loss)
        all_codes = stacked.all_codes.reshape(self.num_quantizers, *token_shape, -1)
        return ResidualVQCodesOutput(quantized, indices, loss, all_codes)

    def _beam(
        self,
        projected: Tensor,
        beam: int,
        num_kept: int | None,
        return_all_codes: bool,
        layer_kwargs: dict[str, Any],
    ) -> ResidualStackOutput:
        """The stack's forward, by beam search; codebooks then learn along the chosen path."""
        batch, _, d = projected.shape
        if num_kept is None:
            num_kept = self.draw_num_kept(projected.device)
        kept = self.num_quantizers if num_kept is None else num_kept
        mask = layer_kwargs.pop("mask", None)
        valid = None if mask is None else mask.reshape(-1)
        rows = projected.reshape(-1, d).float()
        found = beam_search(
            self.stack,
            rows,
            beam,
            kept,
            self.beam_score_quantizer_weights,
            valid,
            self.quant_grad_frac,
            **layer_kwargs,
        )
        m = rows.shape[0]
        if valid is None:
            losses = found.losses.mean(dim=0)
        else:
            losses = (found.losses * valid.unsqueeze(-1)).sum(0) / valid.sum().clamp_min(1)
        dropped = self.num_quantizers - kept
        # (Q,): the reference's shape for a beam search (its greedy pass gives (1, Q))
        losses = torch.cat([losses, losses.new_zeros(dropped)])
        indices = torch.cat([found.indices, found.indices.new_full((m, dropped), -1)], dim=-1)
        if mask is not None:
            layer_kwargs["mask"] = mask
        frozen = layer_kwargs.get("freeze_codebook")
        if self.training:
            self._learn_along(rows.detach(), found, kept, mask, frozen)
        total = found.total.view(batch, -1, d)
        indices = indices.view(batch, -1, self.num_quantizers)
        all_codes = self.stack.get_codes_from_indices(indices) if return_all_codes else None
        return ResidualStackOutput(total, indices, losses, all_codes)

    @torch.no_grad()
    def _learn_along(
        self,
        rows: Tensor,
        found: BeamResult,
        kept: int,
        mask: Tensor | None,
        frozen: bool | None,
    ) -> None:
        """One codebook update per depth from the inputs it saw on the chosen path."""
        m, d = rows.shape
        row_mask = None if mask is None else mask.reshape(1, m)
        # the codes as forward used them, before any update below changes a codebook
        codes = self.stack.get_codes_from_indices(found.indices)[:kept]
        inputs = path_inputs(rows, codes)
        shared = self.stack.shared and self.stack.defer_updates is not None
        context = self.stack.defer_updates(self.stack.layers[0]) if shared else nullcontext()
        with context:
            for depth in range(kept):
                layer = self.stack.layer(depth)
                if frozen or (frozen is None and layer.freeze_codebook):
                    continue
                layer.update_indices(
                    inputs[depth].reshape(1, m, d),
                    found.indices[:, depth].reshape(1, m),
                    mask=row_mask,
                )

    def _cross_entropy(
        self,
        x: Tensor,
        projected: Tensor,
        indices: Tensor,
        token_shape: tuple[int, ...],
        layer_kwargs: dict[str, Any],
    ) -> tuple[Tensor, Tensor]:
        """(quantized, sum over depths of the cross-entropy against the given codes)."""
        if tuple(indices.shape) != (*token_shape, self.num_quantizers):
            raise ValueError(
                f"indices must be {(*token_shape, self.num_quantizers)}, got {tuple(indices.shape)}"
            )
        if bool((indices < 0).any()):
            raise ValueError("indices hold -1 (dropped depths): take them from an eval-mode pass")
        codes = indices.reshape(projected.shape[0], -1, self.num_quantizers)
        residual = projected.float()
        total = torch.zeros_like(residual)
        ce = residual.new_zeros(())
        transforms = self.codebook_transforms()
        for depth in range(self.num_quantizers):
            kwargs = dict(layer_kwargs)
            if transforms is not None and transforms[depth] is not None:
                kwargs["codebook_transform_fn"] = partial(transforms[depth], condition=total)
            quantized, loss = self.stack.layer(depth)(residual, indices=codes[..., depth], **kwargs)
            residual = residual - quantized.detach().float()
            total = total + quantized.float()
            ce = ce + loss
        return self._from_tokens(self._output(total, x), token_shape), ce

    def _output(self, total: Tensor, x: Tensor) -> Tensor:
        """The summed codes through project_out, in the input's dtype."""
        if isinstance(self.project_out, nn.Identity):
            return total.to(x.dtype)
        return self.project_codes(total, x)


@register_quantizer("grvq")
class GroupedResidualVQ(GroupedResidual):
    """`groups` ResidualVQs, each over its own `dim // groups` slice of the features.

    Indices (groups, batch, seq, Q) and losses (groups, 1, Q) ((groups, Q) from a beam
    search); all keywords but `dim`,
    `groups` and `accept_image_fmap` go to every ResidualVQ. All groups share one
    quantize-dropout depth per step.
    """

    member = ResidualVQ
    member_channel_first = "accept_image_fmap"

    @property
    def rvqs(self) -> nn.ModuleList:
        return self.members

    @property
    def codebooks(self) -> Tensor:
        """(groups, Q, codebook_size, codebook_dim)."""
        return torch.stack([rvq.codebooks for rvq in self.members])

    def forward(
        self,
        x: Tensor,
        indices: Tensor | None = None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        mask: Tensor | None = None,
        **kwargs: Any,
    ) -> ResidualVQOutput | ResidualVQCodesOutput | tuple[Tensor, Tensor]:
        """quantized like `x`; indices (G, ..., Q); loss (G, 1, Q); all_codes (G, Q, ..., d).

        The reference's call: `indices` (G, ..., Q) gives (quantized, the groups' summed
        cross-entropy against those codes); `sample_codebook_temp` and `freeze_codebook`
        go to every layer. (Positional order as the reference: x, indices, return_all_codes.)
        """
        if sample_codebook_temp is not None:
            kwargs["sample_codebook_temp"] = sample_codebook_temp
        if freeze_codebook is not None:
            kwargs["freeze_codebook"] = freeze_codebook
        if indices is not None:
            self._check_indices(indices)
            chunks = x.chunk(self.groups, dim=self.split_dim)
            outputs = [
                group(chunk, mask=mask, indices=codes, **kwargs)
                for group, chunk, codes in zip(self.members, chunks, indices, strict=True)
            ]
            quantized = torch.cat([o[0] for o in outputs], dim=self.split_dim)
            return quantized, torch.stack([o[1] for o in outputs]).sum()
        return super().forward(x, mask=mask, return_all_codes=return_all_codes, **kwargs)


@register_quantizer("rvq_shared")
class SharedResidualVQ(ResidualVQ):
    """ResidualVQ with one codebook for all depths (RQ-VAE); `shared_codebook` defaults on."""

    def __init__(self, *, shared_codebook: bool = True, **kwargs: Any) -> None:
        super().__init__(shared_codebook=shared_codebook, **kwargs)


@register_quantizer("rvq_beam")
class BeamResidualVQ(ResidualVQ):
    """ResidualVQ searching its depths with a beam: `beam_size` (training, default 2) and
    `eval_beam_size` (eval and encoding, default 4) paths kept per token (see beam_search.py)."""

    def __init__(
        self, *, beam_size: int | None = 2, eval_beam_size: int | None = 4, **kwargs: Any
    ) -> None:
        super().__init__(beam_size=beam_size, eval_beam_size=eval_beam_size, **kwargs)


def _depth_codebook_sizes(
    codebook_size: int | Sequence[int], num_quantizers: int | None
) -> tuple[int, ...]:
    """One codebook size per depth from the reference's `codebook_size` / `num_quantizers`."""
    if isinstance(codebook_size, int):
        if num_quantizers is None:
            raise ValueError(
                "ResidualVQ needs num_quantizers, or codebook_size as a sequence with one "
                f"size per depth; got codebook_size={codebook_size} and no num_quantizers"
            )
        sizes = (codebook_size,) * num_quantizers
    elif isinstance(codebook_size, Sequence) and not isinstance(codebook_size, str):
        sizes = tuple(codebook_size)
        if num_quantizers is not None and num_quantizers != len(sizes):
            raise ValueError(
                f"codebook_size has {len(sizes)} sizes (one per depth) but num_quantizers="
                f"{num_quantizers}; drop num_quantizers or make them agree"
            )
    else:
        raise ValueError(
            f"codebook_size must be an int or a sequence of ints, got {codebook_size!r}"
        )
    if not sizes or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes
    ):
        raise ValueError(
            f"ResidualVQ needs num_quantizers >= 1 and positive int codebook sizes, got "
            f"codebook_size={codebook_size!r}, num_quantizers={num_quantizers}"
        )
    return sizes
