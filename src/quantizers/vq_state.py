"""Codebook state of `VectorQuantize`: buffers, EMA step, k-means seeding, dead-code revival.

A stack of C codebooks (C = heads with separate codebooks, else 1) of K codes each. With one
codebook the buffers keep their plain shapes (`embed` (K, d), `cluster_size` (K,)); with C > 1
they gain a leading C axis. Everything learned outside gradients passes through
`self.communicator`, so ranks agree: EMA statistics are summed over ranks, and k-means and
dead-code revival draw from the union of the ranks' vectors, as one process would on the whole
batch. On a single process nothing here syncs with the host in the unmasked training step (so
`torch.compile` sees no graph break there); with several ranks the union's size is read.
Non-finite tokens (NaN, inf) are left out of every update by masking, never by filtering.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from src.quantizers.collectives import all_gather_varying, gather_lengths
from src.quantizers.communicator import Distributable
from src.quantizers.kernels import (
    cluster_statistics,
    dead_code_replacements,
    l2_normalize,
    orthogonal_loss,
    smoothed_codebook,
)
from src.quantizers.kernels.codebook_ops import UNIT_ROW_MIN_NORM, refill_candidates


class CodebookState(Distributable):
    """Holds and updates the codebook(s); the subclass sets the hyper-parameters it reads
    (decay, eps, ema_update, threshold_ema_dead_code, heads, orthogonal_reg_*)."""

    def __init__(
        self,
        codebook_size: int,
        codebook_dim: int,
        num_books: int,
        kmeans_init: bool,
        use_cosine_sim: bool,
        learnable: bool,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.num_books = num_books
        self.kmeans_init = kmeans_init
        self.use_cosine_sim = use_cosine_sim
        self.learnable_codebook = learnable
        lead = () if num_books == 1 else (num_books,)
        if kmeans_init:  # filled by k-means on the first training batch
            embed = torch.zeros(*lead, codebook_size, codebook_dim)
        else:
            embed = torch.empty(*lead, codebook_size, codebook_dim)
            for book in embed.view(-1, codebook_size, codebook_dim):
                nn.init.kaiming_uniform_(book)
            if use_cosine_sim:
                embed = l2_normalize(embed)
        if learnable:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        # cluster_size starts at 1 with embed_avg = embed, so embed_avg / cluster_size == embed
        # and an unused code keeps its vector under EMA instead of collapsing towards zero.
        self.register_buffer("cluster_size", torch.ones(*lead, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self._initted_seen = not kmeans_init  # host copy of `initted`, read without a sync
        self._pooled: list[tuple[Tensor, Tensor, Tensor | None]] | None = None
        self._accumulated: tuple[Tensor, Tensor] | None = None  # accum_ema_update statistics

    # ---- views ----------------------------------------------------------------------------

    def books_embed(self) -> Tensor:
        return self.embed.view(self.num_books, self.codebook_size, self.codebook_dim)

    def books_size(self) -> Tensor:
        return self.cluster_size.view(self.num_books, self.codebook_size)

    def books_avg(self) -> Tensor:
        return self.embed_avg.view(self.num_books, self.codebook_size, self.codebook_dim)

    @property
    def codebook(self) -> Tensor:
        """Float32 codebook used for lookup: (K, d), or (heads, K, d) with separate books."""
        embed = self.embed.float()
        return l2_normalize(embed) if self.use_cosine_sim else embed

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> CodebookState:
        """Keep codebook state in float32 when the module is cast (e.g. `.half()`)."""
        super()._apply(fn, recurse)
        for name in ("embed", "cluster_size", "embed_avg"):
            tensor = getattr(self, name)
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._initted_seen = False  # re-read `initted` on the next training step

    def _is_initted(self) -> bool:
        if not self._initted_seen:
            self._initted_seen = bool(self.initted)
        return self._initted_seen

    # ---- updates --------------------------------------------------------------------------

    @torch.no_grad()
    def _set_initial_state(self, centres: Tensor, counts: Tensor) -> None:
        """Install k-means centres (C, K, d) and counts (C, K), as broadcast from rank 0."""
        packed = torch.cat([centres, counts.unsqueeze(-1)], dim=-1)
        packed = self.communicator.broadcast(packed, src=0)
        centres, counts = packed[..., :-1], packed[..., -1]
        self.books_embed().data.copy_(centres)
        self.books_size().copy_(counts)
        self.books_avg().copy_(centres * counts.unsqueeze(-1))
        self.initted.fill_(True)
        self._initted_seen = True

    @contextmanager
    def pooled_updates(self) -> Iterator[None]:
        """Collect the codebook updates of the training calls inside the block, apply once.

        Every call quantizes against the same, unchanged codebook; on leaving the block their
        tokens are concatenated in call order into one EMA step and one dead-code revival,
        exactly as if the calls had been one batch (ResidualVQ with a shared codebook updates
        it from all depths this way). Nothing is applied if the block raises.
        """
        if self._pooled is not None:
            raise RuntimeError("pooled_updates() blocks do not nest")
        self._pooled = []
        try:
            yield
            calls = self._pooled
        finally:
            self._pooled = None
        if calls:
            latents = torch.cat([c[0] for c in calls])
            flat_idx = torch.cat([c[1] for c in calls])
            valid = None
            if any(c[2] is not None for c in calls):
                valid = torch.cat(
                    [
                        c[2] if c[2] is not None else c[1].new_ones(c[1].shape[0], dtype=torch.bool)
                        for c in calls
                    ]
                )
            self._update_codebook(latents, flat_idx, valid, segments=len(calls))

    def _update_or_pool(
        self, latents: Tensor, flat_idx: Tensor, valid: Tensor | None, **options: Any
    ) -> None:
        """Update the codebook now, or keep the statistics for the enclosing pooled_updates()
        (which takes no `options`: a shared residual codebook updates with the defaults)."""
        if self._pooled is None:
            self._update_codebook(latents, flat_idx, valid, **options)
        elif any(v not in (None, False) for v in options.values()):
            raise ValueError(f"pooled codebook updates take no per-call options, got {options}")
        else:
            self._pooled.append((latents, flat_idx, valid))

    @torch.no_grad()
    def _update_codebook(
        self,
        latents: Tensor,
        flat_idx: Tensor,
        valid: Tensor | None,
        segments: int = 1,
        *,
        ema: bool | None = None,
        weight: Tensor | Callable[[Tensor, Tensor], Tensor] | None = None,
        accum: bool = False,
    ) -> None:
        """EMA of cluster sizes (and, with ema_update, of codebook vectors), then dead codes.

        latents (N, heads, d); flat_idx (N, heads) into the stacked (C*K) codebook. `segments`
        > 1 says the tokens are that many equal calls pooled into one update (a shared
        codebook at every residual depth); see `_expire_dead_codes`. `ema` overrides
        `ema_update` for this call; `weight` ((K,) or (C, K), or a function of the summed
        vectors (C, K, d) and counts (C, K) giving one) scales each code's EMA rate (0: the
        code keeps its statistics); `accum` only adds this call's statistics to a running sum
        that the next update without `accum` folds in (gradient-accumulation style).
        With `manual_ema_update` the statistics move but the codes wait for `update_ema()`.
        """
        ema = self.ema_update if ema is None else ema
        num_codes, d = self.num_books * self.codebook_size, self.codebook_dim
        # non-finite tokens (a NaN or inf anywhere in the batch) take no part: weight 0, and
        # zeroed, as 0 * NaN is NaN; a mask rather than a filter, so the host never waits
        finite = torch.isfinite(latents).all(dim=-1)  # (N, heads)
        keep = finite if valid is None else finite & valid.unsqueeze(-1)
        clean = torch.where(finite.unsqueeze(-1), latents, 0.0)
        counts, sums = cluster_statistics(
            clean.reshape(-1, d), flat_idx.reshape(-1), num_codes, keep.reshape(-1).float()
        )
        comm = self.communicator
        if ema or accum:  # one collective for both statistics
            stats = comm.all_reduce(torch.cat([counts.unsqueeze(-1), sums], dim=-1), "sum")
            counts, sums = stats[:, 0], stats[:, 1:]
        else:
            counts = comm.all_reduce(counts, "sum")
        if accum:
            pending = getattr(self, "_accumulated", None)
            self._accumulated = (
                (counts, sums)
                if pending is None
                else (
                    pending[0] + counts,
                    pending[1] + sums,
                )
            )
            return
        pending = getattr(self, "_accumulated", None)
        if pending is not None:
            counts, sums = counts + pending[0], sums + pending[1]
            self._accumulated = None

        size, avg = self.books_size(), self.books_avg()
        if weight is None:  # the plain EMA, in this exact arithmetic (seeded runs unchanged)
            size.mul_(self.decay).add_(counts.view_as(size), alpha=1.0 - self.decay)
            if ema:
                avg.mul_(self.decay).add_(sums.view_as(avg), alpha=1.0 - self.decay)
        else:
            rate = self._ema_rate(weight, sums, counts, size)
            size.add_((counts.view_as(size) - size) * rate)
            if ema:
                avg.add_((sums.view_as(avg) - avg) * rate.unsqueeze(-1))
        if ema and not getattr(self, "manual_ema_update", False):
            self.update_ema()

        if self.threshold_ema_dead_code > 0:
            self._expire_dead_codes(latents, valid, segments)

    def _ema_rate(
        self,
        weight: Tensor | Callable[[Tensor, Tensor], Tensor],
        sums: Tensor,
        counts: Tensor,
        size: Tensor,
    ) -> Tensor:
        """(C, K) per-code EMA rate (1 - decay) * weight."""
        if callable(weight):
            weight = weight(sums.view(*size.shape, -1), counts.view_as(size))
        weight = torch.as_tensor(weight, device=size.device, dtype=torch.float32)
        if weight.shape not in ((self.codebook_size,), tuple(size.shape)):
            raise ValueError(
                f"ema_update_weight must be ({self.codebook_size},) or {tuple(size.shape)}, "
                f"got {tuple(weight.shape)}"
            )
        return (1.0 - self.decay) * weight.expand_as(size)

    @torch.no_grad()
    def update_ema(self) -> None:
        """Recompute the codes from the EMA statistics (called after each EMA step, or by
        the user with `manual_ema_update=True`)."""
        previous = self.books_embed().float()
        embed = smoothed_codebook(self.books_size(), self.books_avg(), previous, self.eps)
        if self.use_cosine_sim:
            embed = self._unit_or_previous(embed, previous)
        self.books_embed().data.copy_(embed)

    @staticmethod
    def _unit_or_previous(embed: Tensor, previous: Tensor) -> Tensor:
        """Cosine codes: `embed` normalised where it has a direction, else the previous code.

        An EMA mean can vanish (a code k-means left empty, or one only zero latents reached,
        has embed_avg 0), and a zero vector normalises to zero, not to a unit code.
        """
        normed = l2_normalize(embed)
        keep = torch.linalg.vector_norm(normed, dim=-1, keepdim=True) > UNIT_ROW_MIN_NORM
        return torch.where(keep, normed, previous)

    @torch.no_grad()
    def _expire_dead_codes(self, latents: Tensor, valid: Tensor | None, segments: int = 1) -> None:
        """Replace codes whose EMA cluster size fell below the threshold by batch vectors.

        Vectors are drawn without replacement from the valid tokens (see
        `dead_code_replacements`); with cosine similarity (near-)zero latents are left out,
        as they have no direction to give a unit code (see `refill_candidates`). With several
        ranks they are drawn from the union of the ranks' valid tokens, exactly as one process
        holding the whole batch would draw them (see `_union_replacements`).
        """
        pools = self._pools(latents, valid)
        # cosine: a non-finite row has a NaN norm, so refill_candidates never admits it
        usable = refill_candidates(pools, self.use_cosine_sim)
        threshold = self.threshold_ema_dead_code
        size = self.books_size()
        if self.communicator.world_size > 1:
            chosen = self._union_replacements(pools, segments, usable)
            if chosen is None:
                return
            take, vectors = chosen
        elif pools.shape[1] == 0:
            return
        else:
            take, vectors = dead_code_replacements(size, threshold, pools, usable)
        if self.use_cosine_sim:  # usable rows are unit up to rounding; make them exactly so
            vectors = l2_normalize(vectors)
        # a code that drew a non-finite token keeps its vector and stays dead: it draws again
        # next step (a mask, not a filter of the pool: no host sync, no extra collective)
        take = take & torch.isfinite(vectors).all(dim=-1)
        embed = self.books_embed()
        embed.data.copy_(torch.where(take.unsqueeze(-1), vectors.to(embed.dtype), embed.data))
        avg = self.books_avg()
        avg.copy_(torch.where(take.unsqueeze(-1), vectors * threshold, avg))
        size.masked_fill_(take, threshold)

    def _union_replacements(
        self, pools: Tensor, segments: int, usable: Tensor | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """Dead-code replacements drawn from the union of every rank's pool (C, M_r, d).

        The union is each rank's pool concatenated in rank order (segment by segment when
        `segments` pooled calls make up the pool, so its order is that of one process on the
        whole batch). Rather than gathering every vector, each rank draws the same way over
        the union's row numbers, rank 0's draw is broadcast, and each rank fills in the
        chosen rows it holds: an all-reduce of (C, K, d) instead of an all-gather of all
        tokens. `usable` (C, M_r), which rows may be drawn, is gathered in the union's order
        (one flag per token). Returns None when nothing is replaced (every rank agrees).
        """
        comm = self.communicator
        if pools.shape[1] % segments:
            raise ValueError(f"a pool of {pools.shape[1]} tokens is not {segments} equal calls")
        local = pools.shape[1] // segments
        lengths = gather_lengths(local, comm, pools.device)
        total = sum(lengths)
        if total == 0:
            return None
        size = self.books_size()
        # The kernel picks rows of its pool; handed row numbers, it returns which rows it drew.
        numbers = torch.arange(segments * total, device=pools.device)
        numbers = numbers.view(1, -1, 1).expand(size.shape[0], -1, 1)
        if usable is not None:  # (C, segments, local) per rank -> (C, segments * total)
            flags = usable.view(usable.shape[0], segments, local).to(torch.uint8)
            flags = all_gather_varying(flags, comm, dim=2, lengths=lengths)
            usable = flags.reshape(size.shape[0], -1).bool()
        take, rows = dead_code_replacements(size, self.threshold_ema_dead_code, numbers, usable)
        packed = comm.broadcast(torch.cat([rows, take.unsqueeze(-1).long()], dim=-1), src=0)
        rows, take = packed[..., 0], packed[..., 1].bool()
        if not bool(take.any()):
            return None
        start = sum(lengths[: comm.rank])
        segment, within = rows // total, rows % total - start
        mine = take & (within >= 0) & (within < local)
        vectors = pools.new_zeros(*take.shape, pools.shape[-1])
        if local > 0:
            index = (segment * local + within).clamp(0, pools.shape[1] - 1)
            picked = pools.gather(1, index.unsqueeze(-1).expand(-1, -1, pools.shape[-1]))
            vectors = torch.where(mine.unsqueeze(-1), picked, vectors)
        return take, comm.all_reduce(vectors, "sum")

    def _pools(self, latents: Tensor, valid: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _seed_rows(self, pools: Tensor) -> Tensor:
        """(C, M) flags of the rows of (C, M, d) pools that may seed a code by k-means: finite
        and, with cosine similarity, not (near-)zero (`refill_candidates`)."""
        finite = torch.isfinite(pools).all(dim=-1)
        usable = refill_candidates(pools, self.use_cosine_sim)
        return finite if usable is None else usable & finite

    def _orthogonal_loss(self, flat_idx: Tensor, valid: Tensor | None, frozen: bool) -> Tensor:
        """Mean over codebooks of the orthogonal regulariser, on all codes or on the codes
        used in this batch (`orthogonal_reg_active_codes_only`), at most
        `orthogonal_reg_max_codes` of them drawn at random."""
        books = self.codebook.view(self.num_books, self.codebook_size, self.codebook_dim)
        if frozen:
            books = books.detach()
        used = flat_idx if valid is None else flat_idx[valid]
        losses = []
        for c in range(self.num_books):
            codes = books[c]
            if self.orthogonal_reg_active_codes_only:
                active = used if self.num_books == 1 else used[:, c]
                codes = codes[torch.unique(active) - c * self.codebook_size]
            limit = self.orthogonal_reg_max_codes
            if limit is not None and codes.shape[0] > limit:
                codes = codes[torch.randperm(codes.shape[0], device=codes.device)[:limit]]
            losses.append(orthogonal_loss(codes))
        return torch.stack(losses).mean()
