"""Plain vector quantizer (VQ-VAE, van den Oord et al. 2017) with an EMA-updated codebook.

Each token (or each of its `heads` slices) is replaced by its nearest codebook vector. The
codebook follows an exponential moving average of the tokens assigned to it (or is learned by
gradient), can be seeded by k-means on the first batch and can revive dead codes from the
current batch (under DDP: the union of every rank's batch). Gradients reach the encoder
through the rotation trick (default) or the straight-through estimator. The codebook-state
bookkeeping lives in `vq_state.py`.
"""

from __future__ import annotations

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
from src.quantizers.vq_state import CodebookState


class VQOutput(NamedTuple):
    """`quantized` has the input's layout; `indices` is int64, shaped like the token positions
    plus a trailing heads axis when heads > 1 (-1 where masked or the token is not finite);
    `loss` is (1,)."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor


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
    which also covers a quantizer built before the process group existed.
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
        rotation_trick: bool = True,
        sync_codebook: bool | None = None,
        ema_update: bool = True,
        learnable_codebook: bool = False,
    ) -> None:
        codebook_dim = dim if codebook_dim is None else codebook_dim
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
        self.ema_update = ema_update
        self.freeze_codebook = freeze_codebook
        self.channel_last = channel_last

        inner = codebook_dim * heads
        projected = inner != dim
        self.project_in = nn.Linear(dim, inner) if projected else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if projected else nn.Identity()
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
        return tokens if self.channel_last else tokens.transpose(1, 2)

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

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codebook vectors, heads concatenated: indices (..., [heads]) -> (..., heads·cb_dim).

        Index -1 (a masked position) gives a zero vector.
        """
        idx = indices if self.heads > 1 else indices.unsqueeze(-1)
        if idx.shape[-1] != self.heads:
            raise ValueError(f"indices must end in a heads axis of {self.heads}, got {idx.shape}")
        check_index_range(indices, self.codebook_size, self, allow_masked=True)
        flat = idx.clamp_min(0) + self._head_offsets(idx.device)
        codes = F.embedding(flat, self._lookup_codebook()).masked_fill((idx < 0).unsqueeze(-1), 0)
        return codes.reshape(*idx.shape[:-1], self.heads * self.codebook_dim)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Decode indices to the forward output (after project_out, in the input layout);
        -1 (masked) gives zeros, any other index outside [0, codebook_size) an error."""
        codes = self.get_codes_from_indices(indices)
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
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
    ) -> VQOutput:
        """Quantize `x`; in training mode (and not frozen) also update the codebook state.

        `indices` (the reference's cross-entropy commitment against given codes) is not
        supported; `sample_codebook_temp` and `freeze_codebook` override the constructor's.
        """
        if indices is not None:
            raise NotImplementedError("VectorQuantize(x, indices=...) is not supported")
        check_float_input(x, type(self).__name__)
        tokens = self._to_tokens(x)
        positions = tokens.shape[:-1]
        valid = self._valid_rows(mask, lens, positions)
        n, heads, d = positions.numel(), self.heads, self.codebook_dim
        index_shape = (*positions, heads) if heads > 1 else positions
        if n == 0:  # nothing to quantize or learn from: no state change, zero loss (not NaN)
            empty = torch.zeros(index_shape, dtype=torch.long, device=x.device)
            return VQOutput(torch.zeros_like(x), empty, x.new_zeros(1, dtype=torch.float32))

        latents = project(self.project_in, tokens.reshape(n, self.dim)).float().view(n, heads, d)
        frozen = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        update = self.training and not frozen
        fused = self._fused_cosine(valid, frozen)
        if fused:  # normalised without a graph; cosine_rotate_commit differentiates it
            raw = latents
            latents, scale = unit_rows_and_scale(raw)
        elif self.use_cosine_sim:
            latents = unit_rows(latents)

        if update and self.kmeans_init and not self._is_initted():
            self._init_by_kmeans(latents.detach(), valid)

        temp = self.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        temp = temp if self.training and self.stochastic_sample_codes else 0.0
        codebook = self._lookup_codebook(frozen)
        flat_idx = self._search(latents, codebook, temp)
        codes = F.embedding(flat_idx, codebook)

        if fused:
            out, loss = cosine_rotate_commit(raw, latents, scale, codes, self.commitment_weight)
        else:
            loss = self._loss(latents, codes, flat_idx, valid, frozen)
            estimator = rotate_to if self.rotation_trick else straight_through
            out = estimator(latents, codes.detach())
        out = like_input(project(self.project_out, out.reshape(n, heads * d).to(x.dtype)), x)

        if update:
            self._update_or_pool(latents.detach(), flat_idx, valid)

        local_idx = flat_idx - self._head_offsets(flat_idx.device)
        # a non-finite token has no code: -1, and no part in the codebook update
        local_idx = local_idx.masked_fill(~torch.isfinite(latents).all(dim=-1), -1)
        if valid is not None:
            out = out.masked_fill(~valid.unsqueeze(-1), 0.0)
            local_idx = local_idx.masked_fill(~valid.unsqueeze(-1), -1)
        quantized = self._from_tokens(out.reshape(*positions, self.dim))
        return VQOutput(quantized, local_idx.reshape(index_shape), loss.reshape(1))

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
        self, latents: Tensor, codes: Tensor, flat_idx: Tensor, valid: Tensor | None, frozen: bool
    ) -> Tensor:
        """Commitment (+ codebook when learnable) over valid positions and all heads, + ortho."""
        loss = latents.new_zeros(())
        if self.commitment_weight != 0:
            loss = self.commitment_weight * masked_mse(latents, codes.detach(), valid)
        if self.learnable_codebook and not frozen:
            loss = loss + masked_mse(codes, latents.detach(), valid)
        if self.orthogonal_reg_weight > 0:
            loss = loss + self.orthogonal_reg_weight * self._orthogonal_loss(
                flat_idx, valid, frozen
            )
        return loss

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
