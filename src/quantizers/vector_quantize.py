"""Plain vector quantizer (VQ-VAE, van den Oord et al. 2017) with an EMA-updated codebook.

Each token is replaced by its nearest codebook vector. The codebook follows an exponential
moving average of the tokens assigned to it (or is learned by gradient), can be seeded by
k-means on the first batch, and can revive dead codes from the current batch. Gradients reach
the encoder through the rotation trick (default) or the straight-through estimator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.quantizers.communicator import Distributable
from src.quantizers.kernels import (
    cluster_statistics,
    kmeans,
    l2_normalize,
    nearest_code,
    rotate_to,
    straight_through,
)
from src.quantizers.registry import register_quantizer


class VQOutput(NamedTuple):
    """`quantized` has the input's layout; `indices` is int64 (-1 where masked); `loss` is (1,)."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor


def _masked_mse(a: Tensor, b: Tensor, valid: Tensor | None) -> Tensor:
    """Mean squared error over the rows of (N, D) tensors where `valid` is True."""
    if valid is None:
        return F.mse_loss(a, b)
    sq = torch.where(valid.unsqueeze(-1), (a - b).pow(2), 0.0)
    return sq.sum() / (valid.sum().clamp_min(1) * a.shape[-1])


@register_quantizer("vq")
class VectorQuantize(Distributable):
    """Vector quantizer with the reference library's keywords, call forms and output shapes.

    Inputs are `(batch, seq, dim)` sequences (`(batch, dim, seq)` with `channel_last=False`)
    or, with `accept_image_fmap=True`, channel-first `(batch, dim, height, width)` maps or
    `(batch, dim, time, height, width)` videos. `mask` (True = valid) has the indices' shape.

    The codebook follows the EMA of its assigned tokens (`ema_update`); with
    `learnable_codebook=True` it is also an `nn.Parameter` trained by the codebook loss, and
    the usual choice is then `ema_update=False` (with both, every EMA step overwrites it).
    `freeze_codebook` stops all codebook changes, `kmeans_init` and dead-code revival included.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        decay: float = 0.8,
        eps: float = 1e-5,
        commitment_weight: float = 1.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        use_cosine_sim: bool = False,
        threshold_ema_dead_code: float = 0,
        accept_image_fmap: bool = False,
        rotation_trick: bool = True,
        learnable_codebook: bool = False,
        ema_update: bool = True,
        freeze_codebook: bool = False,
        channel_last: bool = True,
    ) -> None:
        super().__init__()
        codebook_dim = dim if codebook_dim is None else codebook_dim
        if dim < 1 or codebook_dim < 1 or codebook_size < 1:
            raise ValueError(
                f"dim, codebook_dim and codebook_size must be positive, got {dim}, "
                f"{codebook_dim}, {codebook_size}"
            )
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        if kmeans_iters < 0 or threshold_ema_dead_code < 0 or eps <= 0:
            raise ValueError("kmeans_iters and threshold_ema_dead_code must be >= 0, eps > 0")

        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.num_codebooks = 1
        self.decay = decay
        self.eps = eps
        self.commitment_weight = commitment_weight
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.use_cosine_sim = use_cosine_sim
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.accept_image_fmap = accept_image_fmap
        self.rotation_trick = rotation_trick
        self.learnable_codebook = learnable_codebook
        self.ema_update = ema_update
        self.freeze_codebook = freeze_codebook
        self.channel_last = channel_last

        projected = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if projected else nn.Identity()

        if kmeans_init:  # filled by k-means on the first training batch
            embed = torch.zeros(codebook_size, codebook_dim)
        else:
            embed = nn.init.kaiming_uniform_(torch.empty(codebook_size, codebook_dim))
            if use_cosine_sim:
                embed = l2_normalize(embed)
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        # cluster_size starts at 1 with embed_avg = embed, so embed_avg / cluster_size == embed
        # and an unused code keeps its vector under EMA instead of collapsing towards zero.
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("initted", torch.tensor(not kmeans_init))

    @property
    def codebook(self) -> Tensor:
        """The (codebook_size, codebook_dim) float32 codebook used for lookup."""
        embed = self.embed.float()
        return l2_normalize(embed) if self.use_cosine_sim else embed

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> VectorQuantize:
        """Keep codebook state in float32 when the module is cast (e.g. `.half()`)."""
        super()._apply(fn, recurse)
        for name in ("embed", "cluster_size", "embed_avg"):
            tensor = getattr(self, name)
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()
        return self

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

    # ---- lookup ---------------------------------------------------------------------------

    def _lookup_codebook(self) -> Tensor:
        """The codebook tokens are matched against; carries gradient only when learnable."""
        codebook = self.codebook
        if self.freeze_codebook or not self.learnable_codebook:
            codebook = codebook.detach()
        return codebook

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codebook vectors (codebook_dim space), shape indices.shape + (codebook_dim,).

        Index -1 (a masked position) gives a zero vector.
        """
        codes = F.embedding(indices.clamp_min(0), self._lookup_codebook())
        return codes.masked_fill((indices < 0).unsqueeze(-1), 0.0)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Decode indices to the forward output (after project_out, in the input layout)."""
        codes = self.get_codes_from_indices(indices)
        if isinstance(self.project_out, nn.Linear):
            codes = codes.to(self.project_out.weight.dtype)
        out = self.project_out(codes).masked_fill((indices < 0).unsqueeze(-1), 0.0)
        return self._from_tokens(out)

    # ---- forward --------------------------------------------------------------------------

    def forward(self, x: Tensor, mask: Tensor | None = None) -> VQOutput:
        """Quantize `x`; in training mode (and not frozen) also update the codebook state."""
        tokens = self._to_tokens(x)
        index_shape = tokens.shape[:-1]
        valid = None
        if mask is not None:
            if tuple(mask.shape) != tuple(index_shape):
                raise ValueError(
                    f"mask must have the indices' shape {tuple(index_shape)} (True = valid), "
                    f"got {tuple(mask.shape)}"
                )
            valid = mask.reshape(-1).bool()

        latents = self.project_in(tokens.reshape(-1, self.dim))
        if self.use_cosine_sim:
            latents = l2_normalize(latents)
        latents = latents.float()

        update = self.training and not self.freeze_codebook
        if update and self.kmeans_init and not bool(self.initted):
            self._init_by_kmeans(latents.detach(), valid)

        codebook = self._lookup_codebook()
        indices = nearest_code(latents.detach(), codebook, self.use_cosine_sim)
        codes = F.embedding(indices, codebook)

        loss = self.commitment_weight * _masked_mse(latents, codes.detach(), valid)
        if self.learnable_codebook and not self.freeze_codebook:
            loss = loss + _masked_mse(codes, latents.detach(), valid)

        estimator = rotate_to if self.rotation_trick else straight_through
        out = self.project_out(estimator(latents, codes.detach()).to(x.dtype))

        if update:
            self._update_codebook(latents.detach(), indices, valid)

        if valid is not None:
            out = out.masked_fill(~valid.unsqueeze(-1), 0.0)
            indices = indices.masked_fill(~valid, -1)
        quantized = self._from_tokens(out.reshape(*index_shape, self.dim))
        return VQOutput(quantized, indices.reshape(index_shape), loss.reshape(1))

    # ---- codebook state -------------------------------------------------------------------

    @torch.no_grad()
    def _init_by_kmeans(self, latents: Tensor, valid: Tensor | None) -> None:
        """Seed the codebook with k-means of this rank's batch, then take rank 0's result."""
        samples = latents if valid is None else latents[valid]
        comm = self.communicator
        if samples.shape[0] == 0 and comm.world_size == 1:
            return  # nothing to learn from yet; try again on the next batch
        if samples.shape[0] > 0:
            centres, counts = kmeans(
                samples, self.codebook_size, self.kmeans_iters, self.use_cosine_sim
            )
        else:  # this rank has no valid tokens but must still join the broadcast
            centres, counts = self.embed.float(), self.cluster_size.new_zeros(self.codebook_size)
        packed = comm.broadcast(torch.cat([centres, counts.unsqueeze(-1)], dim=-1), src=0)
        centres, counts = packed[:, :-1], packed[:, -1]
        self.embed.data.copy_(centres)
        self.cluster_size.copy_(counts)
        self.embed_avg.copy_(centres * counts.unsqueeze(-1))
        self.initted.fill_(True)

    @torch.no_grad()
    def _update_codebook(self, latents: Tensor, indices: Tensor, valid: Tensor | None) -> None:
        """EMA of cluster sizes (and, with ema_update, of codebook vectors), then dead codes."""
        weights = None if valid is None else valid.float()
        counts, sums = cluster_statistics(latents, indices, self.codebook_size, weights)
        comm = self.communicator
        if self.ema_update:  # one collective for both statistics
            stats = comm.all_reduce(torch.cat([counts.unsqueeze(-1), sums], dim=-1), "sum")
            counts, sums = stats[:, 0], stats[:, 1:]
        else:
            counts = comm.all_reduce(counts, "sum")

        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        if self.ema_update:
            self.embed_avg.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
            size = self.cluster_size
            total = size.sum()
            # Laplace smoothing keeps every cluster size positive, so no division by zero.
            smoothed = (size + self.eps) / (total + self.codebook_size * self.eps) * total
            embed = torch.where(
                (smoothed > 0).unsqueeze(-1),
                self.embed_avg / smoothed.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1),
                self.embed.float(),
            )
            if self.use_cosine_sim:
                embed = l2_normalize(embed)
            self.embed.data.copy_(embed)

        if self.threshold_ema_dead_code > 0:
            self._expire_dead_codes(latents, valid)

    @torch.no_grad()
    def _expire_dead_codes(self, latents: Tensor, valid: Tensor | None) -> None:
        """Replace codes whose EMA cluster size fell below the threshold by batch vectors.

        Vectors are drawn without replacement; with more dead codes than vectors only the
        first `num_vectors` dead codes are replaced. cluster_size is identical on every rank
        (its statistics are all-reduced), so all ranks agree on the dead set and join the
        broadcast of rank 0's replacement rows.
        """
        threshold = self.threshold_ema_dead_code
        dead = self.cluster_size < threshold
        if not bool(dead.any()):
            return
        dead_idx = dead.nonzero().squeeze(-1)
        samples = latents if valid is None else latents[valid]
        num = min(dead_idx.numel(), samples.shape[0])
        if num > 0:
            rows = dead_idx[:num]
            picked = samples[torch.randperm(samples.shape[0], device=samples.device)[:num]]
            self.embed.data[rows] = picked.to(self.embed.dtype)
            self.embed_avg[rows] = picked * threshold
            self.cluster_size[rows] = threshold
        state = torch.cat(
            [
                self.embed.data[dead_idx].float(),
                self.embed_avg[dead_idx],
                self.cluster_size[dead_idx].unsqueeze(-1),
            ],
            dim=-1,
        )
        state = self.communicator.broadcast(state, src=0)
        d = self.codebook_dim
        self.embed.data[dead_idx] = state[:, :d].to(self.embed.dtype)
        self.embed_avg[dead_idx] = state[:, d : 2 * d]
        self.cluster_size[dead_idx] = state[:, -1]
