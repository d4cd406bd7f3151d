"""Plain vector quantizer (VQ-VAE, van den Oord et al. 2017) with an EMA-updated codebook.

Each token (or each of its `heads` slices) is replaced by its nearest codebook vector. The
codebook follows an exponential moving average of the tokens assigned to it (or is learned by
gradient), can be seeded by k-means on the first batch and can revive dead codes from the
current batch (under DDP: the union of every rank's batch). Gradients reach the encoder
through the rotation trick (default) or the straight-through estimator. The codebook-state
bookkeeping lives in `vq_state.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.quantizers.collectives import all_gather_varying
from src.quantizers.contract import QuantizerContract, check_index_range
from src.quantizers.float_input import check_float_input, like_input, project
from src.quantizers.kernels import (
    code_scores_bias,
    cosine_rotate_commit,
    kmeans,
    masked_mse,
    nearest_code,
    rotate_to,
    straight_through,
    unit_rows,
    unit_rows_and_scale,
)
from src.quantizers.reference_checkpoint import register_reference_keys
from src.quantizers.registry import register_quantizer
from src.quantizers.vq_options import (
    AffineCodebook,
    LossBreakdown,
    check_option_keywords,
    code_logits,
    cross_entropy_to_codes,
    directional_reparam,
    diversity_loss,
    in_place_optimizer,
    topk_codes,
)
from src.quantizers.vq_state import CodebookState


class VQOutput(NamedTuple):
    """`quantized` has the input's layout; `indices` is int64, shaped like the token positions
    plus a trailing heads axis when heads > 1 (-1 where masked or the token is not finite);
    `loss` is (1,)."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor


class VQBreakdownOutput(NamedTuple):
    """VQOutput plus the unweighted loss terms (`return_loss_breakdown=True`)."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    breakdown: LossBreakdown


@register_quantizer("vq")
class VectorQuantize(CodebookState, QuantizerContract):
    """Vector quantizer with the reference library's keywords, call forms and output shapes.

    Inputs are `(batch, seq, dim)` sequences (`(batch, dim, seq)` with `channel_last=False`)
    or, with `accept_image_fmap=True` (or `accept_3d_fmap=True`), channel-first
    `(batch, dim, height, width)` maps or `(batch, dim, time, height, width)` videos.
    `mask` (True = valid) has the token positions' shape; `lens` (batch,) marks the first
    `lens[b]` positions of a sequence valid. Masked positions take no part in the EMA, k-means,
    dead-code revival or the loss; their indices are -1 and their outputs zero.

    Heads: the projected token (width `heads * codebook_dim`) is cut into `heads` slices, each
    quantized on its own, against one shared codebook or, with `separate_codebook_per_head`,
    one codebook per head (`embed` is then (heads, codebook_size, codebook_dim)). Indices get
    a trailing heads axis and `num_codebooks == heads` either way: every head emits one code
    per position, so the usage metric reads one column per head (with a shared codebook all
    columns index the same codes, and per-head usage still says how much of it each head uses).

    The codebook follows the EMA of its assigned tokens (`ema_update`); with
    `learnable_codebook=True` it is also an `nn.Parameter` trained by the codebook loss, and
    the usual choice is then `ema_update=False` (with both, every EMA step overwrites it).
    `orthogonal_reg_weight > 0` adds the orthogonal regulariser (Shin et al. 2021) of the
    normalised codebook to the loss and, as it needs gradients, makes the codebook learnable.
    `stochastic_sample_codes` draws training codes from softmax(-distance / temperature).
    `freeze_codebook` stops all codebook changes, `kmeans_init` and dead-code revival included.
    `sync_codebook` is accepted for compatibility and does nothing: whether statistics are
    synchronised is decided at call time by the installed communicator (`set_communicator`),
    which also covers a quantizer built before the process group existed. `sync_kmeans` too:
    k-means always runs on every rank's tokens and rank 0's result is broadcast (the
    reference's `sync_kmeans=False` would seed each rank's codebook from its own batch and
    leave the ranks' codebooks different).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        decay: float = 0.8,
        eps: float = 1e-5,
        freeze_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        use_cosine_sim: bool = False,
        threshold_ema_dead_code: float = 0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        commitment_weight: float = 1.0,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        rotation_trick: bool | None = None,
        sync_codebook: bool | None = None,
        sync_kmeans: bool = True,
        ema_update: bool | None = None,
        learnable_codebook: bool | None = None,
        layernorm_after_project_in: bool = False,
        commitment_use_cross_entropy_loss: bool = False,
        codebook_diversity_loss_weight: float = 0.0,
        codebook_diversity_temperature: float = 100.0,
        straight_through: bool = False,
        directional_reparam: bool = False,
        directional_reparam_variance: float = 5e-3,
        sync_affine_param: bool = False,
        vq_bridge: nn.Module | None = None,
        manual_ema_update: bool = False,
        in_place_codebook_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        manual_in_place_optimizer_update: bool = False,
        affine_param: bool = False,
        affine_param_batch_decay: float = 0.99,
        affine_param_codebook_decay: float = 0.9,
        sync_update_v: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        route_gradients_to_input: bool = True,
    ) -> None:
        codebook_dim = dim if codebook_dim is None else codebook_dim
        # the reference's defaults: DiVeQ and a bridge learn the codebook by gradient
        learns_by_gradient = directional_reparam or vq_bridge is not None
        ema_update = not learns_by_gradient if ema_update is None else ema_update
        if learnable_codebook is None:
            learnable_codebook = learns_by_gradient
        if rotation_trick is None:
            rotation_trick = not (directional_reparam or straight_through)
        check_option_keywords(
            rotation_trick=rotation_trick,
            straight_through=straight_through,
            directional_reparam=directional_reparam,
            threshold_ema_dead_code=threshold_ema_dead_code,
            learnable_codebook=learnable_codebook,
            vq_bridge=vq_bridge,
            ema_update=ema_update,
            sync_update_v=sync_update_v,
            affine_param=affine_param,
            use_cosine_sim=use_cosine_sim,
            codebook_diversity_loss_weight=codebook_diversity_loss_weight,
        )
        if dim < 1 or codebook_dim < 1 or codebook_size < 1 or heads < 1:
            raise ValueError(
                f"dim, codebook_dim, codebook_size and heads must be positive, got {dim}, "
                f"{codebook_dim}, {codebook_size}, {heads}"
            )
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        if kmeans_iters < 0 or threshold_ema_dead_code < 0 or eps <= 0:
            raise ValueError("kmeans_iters and threshold_ema_dead_code must be >= 0, eps > 0")
        if sample_codebook_temp < 0 or orthogonal_reg_weight < 0:
            raise ValueError("sample_codebook_temp and orthogonal_reg_weight must be >= 0")
        super().__init__(
            codebook_size=codebook_size,
            codebook_dim=codebook_dim,
            num_books=heads if separate_codebook_per_head else 1,
            kmeans_init=kmeans_init,
            use_cosine_sim=use_cosine_sim,
            learnable=learnable_codebook or orthogonal_reg_weight > 0,
        )
        self.dim = dim
        self.heads = heads
        self.separate_codebook_per_head = separate_codebook_per_head
        self.num_codebooks = heads
        self.decay = decay
        self.eps = eps
        self.commitment_weight = commitment_weight
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.accept_image_fmap = accept_image_fmap or accept_3d_fmap
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sample_codebook_temp = sample_codebook_temp
        self.rotation_trick = rotation_trick
        self.sync_codebook = sync_codebook  # no effect; see the class docstring
        self.sync_kmeans = sync_kmeans
        self.ema_update = ema_update
        self.manual_ema_update = manual_ema_update
        self.freeze_codebook = freeze_codebook
        self.channel_last = channel_last
        self.commitment_use_cross_entropy_loss = commitment_use_cross_entropy_loss
        self.codebook_diversity_loss_weight = codebook_diversity_loss_weight
        self.codebook_diversity_temperature = codebook_diversity_temperature
        self.straight_through = straight_through
        self.directional_reparam = directional_reparam
        self.directional_reparam_variance = directional_reparam_variance
        self.sync_update_v = sync_update_v
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.route_gradients_to_input = route_gradients_to_input
        self.manual_in_place_optimizer_update = manual_in_place_optimizer_update

        inner = codebook_dim * heads
        projected = inner != dim
        self.project_in = nn.Linear(dim, inner) if projected else nn.Identity()
        # the reference adds the norm only where it projects
        use_norm = layernorm_after_project_in and projected
        self.project_in_norm = nn.LayerNorm(inner) if use_norm else None
        self.project_out = nn.Linear(inner, dim) if projected else nn.Identity()
        self.vq_bridge = vq_bridge
        self.affine = (
            AffineCodebook(
                self.num_books,
                codebook_dim,
                affine_param_batch_decay,
                affine_param_codebook_decay,
                sync_affine_param,
            )
            if affine_param
            else None
        )
        self.in_place_codebook_optimizer = in_place_optimizer(in_place_codebook_optimizer, self)
        register_reference_keys(self)  # load_state_dict takes the reference library's keys

    # ---- layout ---------------------------------------------------------------------------

    def _to_tokens(self, x: Tensor) -> Tensor:
        """Input layout -> channel-last (..., dim) view, validating rank and feature size."""
        shape = tuple(x.shape)
        if self.accept_image_fmap:
            if x.ndim not in (4, 5) or shape[1] != self.dim:
                raise ValueError(
                    f"VectorQuantize(accept_image_fmap=True) expects (batch, dim={self.dim}, "
                    f"height, width) or (batch, dim={self.dim}, time, height, width) input, "
                    f"got shape {shape}"
                )
            return x.movedim(1, -1)
        feature_axis = 2 if self.channel_last else 1
        if x.ndim != 3 or shape[feature_axis] != self.dim:
            layout = (
                f"(batch, seq, dim={self.dim})"
                if self.channel_last
                else f"(batch, dim={self.dim}, seq) (channel_last=False)"
            )
            raise ValueError(
                f"VectorQuantize expects {layout} input, got shape {shape}; pass "
                f"accept_image_fmap=True for (batch, dim, height, width) maps"
            )
        return x if self.channel_last else x.transpose(1, 2)

    def _from_tokens(self, tokens: Tensor) -> Tensor:
        """Channel-last (..., dim) -> the input layout."""
        if self.accept_image_fmap:
            return tokens.movedim(-1, 1)
        return tokens if self.channel_last else tokens.movedim(-1, 1)

    def _valid_rows(
        self, mask: Tensor | None, lens: Tensor | None, positions: torch.Size
    ) -> Tensor | None:
        """(N,) bool of valid token positions from `mask` and/or `lens`, None if all valid."""
        valid = None
        if mask is not None:
            if tuple(mask.shape) != tuple(positions):
                raise ValueError(
                    f"mask must have the indices' shape {tuple(positions)} without the heads "
                    f"axis (True = valid), got {tuple(mask.shape)}"
                )
            valid = mask.bool()
        if lens is not None:
            if len(positions) != 2 or tuple(lens.shape) != (positions[0],):
                raise ValueError(
                    f"lens must be (batch,) = ({positions[0]},) lengths of (batch, seq) "
                    f"sequences, got lens {tuple(lens.shape)} for positions {tuple(positions)}"
                )
            from_lens = torch.arange(positions[1], device=lens.device) < lens.unsqueeze(-1)
            valid = from_lens if valid is None else valid & from_lens
        return None if valid is None else valid.reshape(-1)

    # ---- lookup ---------------------------------------------------------------------------

    def _lookup_codebook(self, frozen: bool | None = None) -> Tensor:
        """(C*K, codebook_dim) float32 codebook; carries gradient only when learnable."""
        frozen = self.freeze_codebook if frozen is None else frozen
        codebook = self.codebook.reshape(-1, self.codebook_dim)
        return codebook.detach() if frozen or not self.learnable_codebook else codebook

    def _head_offsets(self, device: torch.device) -> Tensor | int:
        """Added to a head's local index to address the stacked (C*K) codebook."""
        if self.num_books == 1:
            return 0
        return torch.arange(self.heads, device=device) * self.codebook_size

    def get_codes_from_indices(
        self, indices: Tensor, codebook_transform_fn: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor:
        """Codebook vectors, heads concatenated: indices (..., [heads]) -> (..., heads·cb_dim).

        Index -1 (a masked position) gives a zero vector. `codebook_transform_fn` (one head)
        is forward's: each position's code is then read from its own transformed codebook.
        """
        idx = indices if self.heads > 1 else indices.unsqueeze(-1)
        if idx.shape[-1] != self.heads:
            raise ValueError(f"indices must end in a heads axis of {self.heads}, got {idx.shape}")
        if codebook_transform_fn is not None and self.heads > 1:
            raise ValueError("codebook_transform_fn works with heads=1 only")
        check_index_range(indices, self.codebook_size, self, allow_masked=True)
        flat = idx.clamp_min(0) + self._head_offsets(idx.device)
        codebook = self._search_codebook(
            self.freeze_codebook, codebook_transform_fn, idx.shape[:-1]
        )
        if codebook.ndim == 3:  # (N, K, d): one codebook per position
            codes = self._gather(codebook, flat.reshape(-1, 1)).reshape(*flat.shape, -1)
        else:
            codes = F.embedding(flat, codebook)
        codes = codes.masked_fill((idx < 0).unsqueeze(-1), 0)
        return codes.reshape(*idx.shape[:-1], self.heads * self.codebook_dim)

    def decode_indices(
        self, indices: Tensor, codebook_transform_fn: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor:
        """Decode indices to the forward output (after project_out, in the input layout);
        -1 (masked) gives zeros, any other index outside [0, codebook_size) an error.
        `codebook_transform_fn`: as forward's (implicit neural codebooks)."""
        codes = self.get_codes_from_indices(indices, codebook_transform_fn)
        if isinstance(self.project_out, nn.Linear):
            codes = codes.to(self.project_out.weight.dtype)
        masked = (indices < 0) if self.heads == 1 else (indices < 0).any(-1)
        out = self.project_out(codes).masked_fill(masked.unsqueeze(-1), 0.0)
        return self._from_tokens(out)

    get_output_from_indices = decode_indices  # the reference's name

    def _search(self, latents: Tensor, codebook: Tensor, temperature: float) -> Tensor:
        """(N, heads) indices into the stacked (C*K, d) codebook for (N, heads, d) latents."""
        bias = code_scores_bias(codebook, self.use_cosine_sim)
        n, heads, d = latents.shape
        cosine = self.use_cosine_sim  # then latents and codebook are unit rows already
        search = {"temperature": temperature, "use_cosine_sim": cosine, "normalized": cosine}
        if self.num_books == 1:
            found = nearest_code(latents.reshape(n * heads, d), codebook, bias=bias, **search)
            return found.view(n, heads)
        k = self.codebook_size
        found = [
            nearest_code(
                latents[:, h],
                codebook[h * k : (h + 1) * k],
                bias=None if bias is None else bias[h * k : (h + 1) * k],
                **search,
            )
            + h * k
            for h in range(heads)
        ]
        return torch.stack(found, dim=-1)

    # ---- forward --------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        indices: Tensor | None = None,
        mask: Tensor | None = None,
        lens: Tensor | None = None,
        topk: int | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        return_loss_breakdown: bool = False,
        codebook_transform_fn: Callable[[Tensor], Tensor] | None = None,
        ema_update_weight: Tensor | Callable[[Tensor, Tensor], Tensor] | None = None,
        accum_ema_update: bool = False,
        ema_update: bool | None = None,
    ) -> VQOutput | VQBreakdownOutput | tuple[Tensor, Tensor]:
        """Quantize `x`; in training mode (and not frozen) also update the codebook state.

        `sample_codebook_temp` and `freeze_codebook` override the constructor's. The
        reference's other call keywords:
        - `topk=k` (one head): the k nearest codes, nearest first: quantized
          (..., k, dim) (channel-first layouts: the k axis last), indices (..., k), and a
          per-token commitment loss (..., k) (zero where masked); no codebook update. In
          training with `stochastic_sample_codes`: k codes drawn without replacement from
          softmax(logits / temperature) (Gumbel-top-k, as the reference).
        - `indices` (..., [heads]): returns (quantized, cross-entropy of the code logits
          against these codes) instead, -1 ignored (the reference returns the pre-projection
          codes there; ours are in the input layout like every other output).
        - `ema_update` (bool) overrides the constructor's for this call;
          `ema_update_weight` ((K,) / (C, K) or a function of the summed vectors and counts)
          scales each code's EMA rate; `accum_ema_update` only accumulates the statistics for
          the next update (see `CodebookState._update_codebook`).
        - `codebook_transform_fn` (one head): maps the codebook (C, K, d) to one codebook per
          token (C, batch, seq, K, d), searched instead (implicit neural codebooks).
        - `return_loss_breakdown`: a fourth field with the unweighted loss terms.
        """
        check_float_input(x, type(self).__name__)
        tokens = self._to_tokens(x)
        positions = tokens.shape[:-1]
        valid = self._valid_rows(mask, lens, positions)
        n, heads, d = positions.numel(), self.heads, self.codebook_dim
        k = self._check_topk(topk, codebook_transform_fn)
        frozen = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        plain = self._plain_call(k, indices, codebook_transform_fn, return_loss_breakdown)
        index_shape = (*positions, k) if k else (*positions, heads) if heads > 1 else positions
        if n == 0:  # nothing to quantize or learn from: no state change, zero loss (not NaN)
            empty = torch.zeros(index_shape, dtype=torch.long, device=x.device)
            zero = x.new_zeros(index_shape if k else (1,), dtype=torch.float32)
            out_shape = (*positions, k, self.dim) if k else (*positions, self.dim)
            return VQOutput(self._from_tokens(x.new_zeros(out_shape)), empty, zero)

        latents = project(self.project_in, tokens.reshape(n, self.dim))
        if self.project_in_norm is not None:
            latents = self.project_in_norm(latents)
        latents = latents.float().view(n, heads, d)
        update = self.training and not frozen
        fused = plain and self._fused_cosine(valid, frozen)
        if fused:  # normalised without a graph; cosine_rotate_commit differentiates it
            raw = latents
            latents, scale = unit_rows_and_scale(raw)
        elif self.use_cosine_sim:
            latents = unit_rows(latents)

        if update and self.kmeans_init and not self._is_initted():
            self._init_by_kmeans(latents.detach(), valid)
        if update and self.affine is not None:
            self.affine.update(self._pools(latents.detach(), valid), self.books_embed().float())

        temp = self.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        temp = temp if self.training and self.stochastic_sample_codes else 0.0
        codebook = self._search_codebook(frozen, codebook_transform_fn, tokens.shape[:-1])
        if not plain and not codebook.requires_grad:
            # the EMA step below rewrites the buffer in place (through .data, unseen by
            # autograd); logits and soft codes must differentiate against this step's codes
            codebook = codebook.clone()
        flat_idx = self._find(latents, codebook, temp, k)
        codes = self._gather(codebook, flat_idx)

        inplace_loss = latents.new_zeros(())
        if update and self.in_place_codebook_optimizer is not None:
            inplace_loss = self._in_place_step(latents, valid)
            codebook = self._search_codebook(frozen, codebook_transform_fn, tokens.shape[:-1])
            flat_idx = self._find(latents, codebook, temp, k)
            codes = self._gather(codebook, flat_idx)

        logits = None
        if self._needs_logits(indices, temp):
            logits = self._code_logits(latents, codebook)
        if indices is not None:  # the reference's cross-entropy against given codes
            target = indices.reshape(n, heads).long()
            if valid is not None:
                target = target.masked_fill(~valid.unsqueeze(-1), -1)
            out = straight_through(latents, codes.detach()) if self.training else codes
            out = like_input(project(self.project_out, out.reshape(n, heads * d).to(x.dtype)), x)
            quantized = self._from_tokens(out.reshape(*positions, self.dim))
            return quantized, cross_entropy_to_codes(logits, target)

        if fused:
            out, loss = cosine_rotate_commit(raw, latents, scale, codes, self.commitment_weight)
            parts = None
        else:
            loss, parts = self._loss(latents, codes, flat_idx, valid, frozen, logits, k)
            out = self._estimate(latents, codes, logits, codebook, temp, k)
        width = heads * d
        out = out.reshape(n, k, width) if k else out.reshape(n, width)
        out = like_input(project(self.project_out, out.to(x.dtype)), x)

        if update and not k:  # top-k calls leave the codebook alone, as in the reference
            learn_from = latents.detach()
            if self.affine is not None:
                book = slice(None) if self.num_books > 1 else 0
                learn_from = self.affine.to_codebook_space(learn_from, book)
            options = {"ema": ema_update, "weight": ema_update_weight, "accum": accum_ema_update}
            self._update_or_pool(learn_from, flat_idx, valid, **options)

        local_idx = flat_idx - self._head_offsets(flat_idx.device)
        # a non-finite token has no code: -1, and no part in the codebook update
        local_idx = local_idx.masked_fill(~torch.isfinite(latents).all(dim=-1), -1)
        if valid is not None:
            keep = valid.view(n, *([1] * (out.ndim - 1)))
            fill = 0.0
            if not self.return_zeros_for_masked_padding:  # the input passes through
                fill = tokens.reshape(n, *([1] * (out.ndim - 2)), self.dim).to(out.dtype)
            out = torch.where(keep, out, fill)
            local_idx = local_idx.masked_fill(~valid.unsqueeze(-1), -1)
        out_shape = (*positions, k, self.dim) if k else (*positions, self.dim)
        quantized = self._from_tokens(out.reshape(out_shape))
        loss = loss.reshape(index_shape) if k else loss.reshape(1)
        result = VQOutput(quantized, local_idx.reshape(index_shape), loss)
        if not return_loss_breakdown:
            return result
        if parts is None:  # the fused path: its loss is the weighted commitment
            zero = loss.new_zeros(())
            weight = self.commitment_weight or 1.0
            parts = LossBreakdown(loss.reshape(()) / weight, zero, zero, zero)
        return VQBreakdownOutput(*result, parts._replace(inplace_optimize=inplace_loss))

    # ---- forward pieces -------------------------------------------------------------------

    def _check_topk(self, topk: int | None, transform: Callable | None) -> int:
        """The number of codes per token to return (0: the nearest only, the usual call)."""
        if topk is None:
            if transform is not None and self.heads > 1:
                raise ValueError("codebook_transform_fn works with heads=1 only")
            return 0
        k = min(int(topk), self.codebook_size)
        if k < 1 or self.heads > 1 or transform is not None:
            raise ValueError(
                f"topk must be >= 1, with heads=1 and no codebook_transform_fn; got topk={topk}, "
                f"heads={self.heads}"
            )
        if self.training and (
            self.commitment_use_cross_entropy_loss or self.in_place_codebook_optimizer is not None
        ):
            raise ValueError(
                "topk does not combine with commitment_use_cross_entropy_loss or "
                "in_place_codebook_optimizer in training mode"
            )
        return k

    def _plain_call(
        self, k: int, indices: Tensor | None, transform: Callable | None, breakdown: bool
    ) -> bool:
        """True when no optional behaviour is on: the original, fastest path."""
        return not (
            k
            or indices is not None
            or transform is not None
            or breakdown
            or self.commitment_use_cross_entropy_loss
            or self.codebook_diversity_loss_weight > 0
            or self.straight_through
            or self.directional_reparam
            or not self.route_gradients_to_input
            or self.sync_update_v > 0
            or self.vq_bridge is not None
            or self.affine is not None
            or self.in_place_codebook_optimizer is not None
        )

    def _needs_logits(self, indices: Tensor | None, temp: float) -> bool:
        return indices is not None or (
            self.training
            and (
                self.commitment_use_cross_entropy_loss
                or self.codebook_diversity_loss_weight > 0
                or (self.straight_through and temp > 0)
            )
        )

    def _search_codebook(
        self, frozen: bool, transform: Callable | None, token_shape: torch.Size
    ) -> Tensor:
        """The codes searched and returned: (C*K, d), through `vq_bridge` and the affine
        map when set, or (N, K, d) per token with a `codebook_transform_fn`."""
        codebook = self._lookup_codebook(frozen)
        if self.vq_bridge is None and self.affine is None and transform is None:
            return codebook
        books = codebook.view(self.num_books, self.codebook_size, self.codebook_dim)
        if self.vq_bridge is not None:
            books = self.vq_bridge(books)
        if self.affine is not None:
            books = self.affine.codes(books)
        if transform is not None:  # (1, *token_shape, K, d) -> (N, K, d)
            per_token = transform(books)
            per_token = per_token.reshape(-1, self.codebook_size, per_token.shape[-1]).float()
            return unit_rows(per_token) if self.use_cosine_sim else per_token
        return books.reshape(-1, self.codebook_dim)

    def _find(self, latents: Tensor, codebook: Tensor, temp: float, k: int) -> Tensor:
        """Indices into the stacked codebook: (N, heads), or (N, k) for top-k."""
        if codebook.ndim == 3:  # one codebook per token
            with torch.no_grad():
                logits = code_logits(latents[:, 0], codebook, self.use_cosine_sim)
                if k:
                    return logits.topk(k, dim=-1).indices
                if temp > 0:  # Gumbel-max sample of softmax(logits / temp)
                    noise = torch.empty_like(logits).exponential_().log_()
                    logits = logits / temp - noise
                return logits.argmax(dim=-1, keepdim=True)
        if k:
            return topk_codes(latents[:, 0], codebook, k, self.use_cosine_sim, temp)
        return self._search(latents, codebook, temp)

    @staticmethod
    def _gather(codebook: Tensor, flat_idx: Tensor) -> Tensor:
        if codebook.ndim == 3:  # (N, K, d) per token
            index = flat_idx.unsqueeze(-1).expand(-1, -1, codebook.shape[-1])
            return codebook.gather(1, index)
        return F.embedding(flat_idx, codebook)

    def _code_logits(self, latents: Tensor, codebook: Tensor) -> Tensor:
        """(N, heads, K) logits of each head's codes (differentiable)."""
        n, heads, d = latents.shape
        if codebook.ndim == 3:
            return code_logits(latents[:, 0], codebook, self.use_cosine_sim).unsqueeze(1)
        if self.num_books == 1:
            flat = code_logits(latents.reshape(n * heads, d), codebook, self.use_cosine_sim)
            return flat.view(n, heads, -1)
        size = self.codebook_size
        per_head = [
            code_logits(latents[:, h], codebook[h * size : (h + 1) * size], self.use_cosine_sim)
            for h in range(heads)
        ]
        return torch.stack(per_head, dim=1)

    def _estimate(
        self,
        latents: Tensor,
        codes: Tensor,
        logits: Tensor | None,
        codebook: Tensor,
        temp: float,
        k: int,
    ) -> Tensor:
        """The output in codebook space: the codes' values with the chosen gradient path."""
        source = latents.expand(-1, k, -1) if k else latents
        if not self.route_gradients_to_input:
            out = codes
        elif self.training and self.directional_reparam:
            out = directional_reparam(source, codes, self.directional_reparam_variance)
        elif self.training and self.straight_through and temp > 0 and logits is not None:
            books = codebook.view(self.num_books, self.codebook_size, -1)
            probs = (logits / temp).softmax(dim=-1)
            soft = torch.einsum("nhk,hkd->nhd", probs, books.expand(self.heads, -1, -1).detach())
            out = codes.detach() + soft - soft.detach()
        else:
            estimator = rotate_to if self.rotation_trick else straight_through
            out = estimator(source, codes.detach())
        if self.training and self.sync_update_v > 0:  # (21) of Huh et al. 2023
            out = out + self.sync_update_v * (codes - codes.detach())
        return out

    def _in_place_step(self, latents: Tensor, valid: Tensor | None) -> Tensor:
        """One step of the in-place codebook optimizer on the codebook loss (codes towards
        their latents); returns that loss, detached."""
        with torch.enable_grad():
            codebook = self._search_codebook(False, None, latents.shape[:1])
            flat_idx = self._search(latents.detach(), codebook.detach(), 0.0)
            loss = masked_mse(self._gather(codebook, flat_idx), latents.detach(), valid)
            loss.backward()
        if not self.manual_in_place_optimizer_update:
            self.update_in_place_optimizer()
        return loss.detach()

    def update_in_place_optimizer(self) -> None:
        """Step the in-place codebook optimizer (gradients averaged over ranks first)."""
        optimizer = self.in_place_codebook_optimizer
        if optimizer is None:
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None and self.communicator.world_size > 1:
                    param.grad.copy_(self.communicator.all_reduce(param.grad, "mean"))
        optimizer.step()
        optimizer.zero_grad()

    @torch.no_grad()
    def update_indices(
        self, x: Tensor, indices: Tensor, mask: Tensor | None = None, lens: Tensor | None = None
    ) -> None:
        """One codebook update (EMA, dead codes) from `x` assigned to the given `indices`
        (e.g. codes chosen outside, by a beam search); -1 entries take no part."""
        tokens = self._to_tokens(x)
        positions = tokens.shape[:-1]
        valid = self._valid_rows(mask, lens, positions)
        n, heads, d = positions.numel(), self.heads, self.codebook_dim
        latents = project(self.project_in, tokens.reshape(n, self.dim))
        if self.project_in_norm is not None:
            latents = self.project_in_norm(latents)
        latents = latents.float().view(n, heads, d)
        if self.use_cosine_sim:
            latents = unit_rows(latents)
        idx = indices.reshape(n, heads).long()
        given = (idx >= 0).all(dim=-1)
        valid = given if valid is None else valid & given
        flat = idx.clamp_min(0) + self._head_offsets(idx.device)
        if self.affine is not None:
            latents = self.affine.to_codebook_space(latents, slice(None) if heads > 1 else 0)
        self._update_or_pool(latents, flat, valid)  # pooled inside pooled_updates()

    update_ema_indices = update_indices  # the reference's older name

    @property
    def _codebook(self) -> VectorQuantize:
        """The reference keeps the codebook state in a `_codebook` submodule; here it is the
        quantizer itself (so `vq._codebook.embed_avg` reads as in the reference)."""
        return self

    def _fused_cosine(self, valid: Tensor | None, frozen: bool) -> bool:
        """Whether the commitment loss, rotation trick and normalisation can run as one node:
        cosine codes, rotation trick, no mask, no gradient for the codebook, no extra loss."""
        codebook_learns = self.learnable_codebook and not frozen
        return (
            self.use_cosine_sim
            and self.rotation_trick
            and valid is None
            and not codebook_learns
            and self.orthogonal_reg_weight == 0
        )

    def _loss(
        self,
        latents: Tensor,
        codes: Tensor,
        flat_idx: Tensor,
        valid: Tensor | None,
        frozen: bool,
        logits: Tensor | None = None,
        k: int = 0,
    ) -> tuple[Tensor, LossBreakdown]:
        """Commitment (+ codebook when learnable) over valid positions and all heads, +
        ortho, + codebook diversity; with top-k, a per-token (N, k) commitment instead.
        Returns the weighted total and the unweighted terms."""
        zero = latents.new_zeros(())
        loss = commit = diversity = ortho = zero
        if k:  # per token and code: mean over the feature axis, zero where masked
            commit = (codes.detach() - latents).pow(2).mean(dim=-1)
            if valid is not None:
                commit = commit.masked_fill(~valid.unsqueeze(-1), 0.0)
            weight = self.commitment_weight if self.commitment_weight > 0 else 1.0
            loss = weight * commit
        elif self.commitment_weight != 0 and not self.directional_reparam:
            if self.commitment_use_cross_entropy_loss and logits is not None:
                target = flat_idx - self._head_offsets(flat_idx.device)
                if valid is not None:
                    target = target.masked_fill(~valid.unsqueeze(-1), -1)
                commit = cross_entropy_to_codes(logits, target)
            else:
                commit = masked_mse(latents, codes.detach(), valid)
            loss = self.commitment_weight * commit
        if self.learnable_codebook and not frozen and not self.directional_reparam:
            loss = loss + masked_mse(codes, latents.detach(), valid)
        if self.orthogonal_reg_weight > 0:
            ortho = self._orthogonal_loss(flat_idx, valid, frozen)
            loss = loss + self.orthogonal_reg_weight * ortho
        if self.training and self.codebook_diversity_loss_weight > 0 and logits is not None:
            diversity = diversity_loss(logits, valid, self.codebook_diversity_temperature)
            loss = loss + self.codebook_diversity_loss_weight * diversity
        return loss, LossBreakdown(commit, diversity, ortho, zero)

    # ---- codebook state -------------------------------------------------------------------

    def _pools(self, latents: Tensor, valid: Tensor | None) -> Tensor:
        """(C, M, d): the valid vectors each codebook may learn from (all heads if shared)."""
        if valid is not None:
            latents = latents[valid]
        if self.num_books == 1:
            return latents.reshape(1, -1, self.codebook_dim)
        return latents.transpose(0, 1)

    @torch.no_grad()
    def _init_by_kmeans(self, latents: Tensor, valid: Tensor | None) -> None:
        """Seed each codebook with k-means of the valid tokens of every rank's batch (with
        cosine similarity, of those that are not (near-)zero).

        With several ranks the pools are gathered (in rank order: the whole batch, as one
        process would see it) and every rank runs the same k-means on that union, keeping the
        ranks' random streams in step; rank 0's result is then broadcast, so the codebooks
        are identical even where a kernel is not bitwise deterministic.
        """
        pools = self._pools(latents, valid)
        if self.communicator.world_size > 1:
            pools = all_gather_varying(pools, self.communicator, dim=1)
        # non-finite latents, and with cosine similarity (near-)zero ones, seed no code
        usable = self._seed_rows(pools)
        samples = [book[rows] for book, rows in zip(pools, usable, strict=True)]
        if any(book.shape[0] == 0 for book in samples):
            return  # nothing to learn from yet (no valid, or no usable, token): try next batch
        centres, counts = [], []
        for c in range(self.num_books):
            found = kmeans(samples[c], self.codebook_size, self.kmeans_iters, self.use_cosine_sim)
            centres.append(found[0])
            counts.append(found[1])
        self._set_initial_state(torch.stack(centres), torch.stack(counts))
