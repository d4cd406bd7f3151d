"""Pieces of VectorQuantize's optional behaviours (the reference library's newer keywords).

Kept apart from `vector_quantize.py` so the default path stays short: code logits for the
losses that need a distribution over codes (cross-entropy commitment, codebook diversity,
cross-entropy against given indices) and for top-k search, the Gumbel straight-through and
directional-reparameterisation (DiVeQ) estimators, and the affine re-parameterisation of the
codebook (running batch / codebook moments). All statistics are float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.quantizers.communicator import Distributable
from src.quantizers.kernels import l2_normalize


class LossBreakdown(NamedTuple):
    """The terms of VectorQuantize's loss (`return_loss_breakdown=True`), each unweighted."""

    commitment: Tensor
    codebook_diversity: Tensor
    orthogonal_reg: Tensor
    inplace_optimize: Tensor


def code_logits(latents: Tensor, codebook: Tensor, use_cosine_sim: bool) -> Tensor:
    """(N, K) float32 logits of each code: the dot product (cosine, unit rows) or minus the
    Euclidean distance, as the reference scores codes for its distributions. Differentiable
    in both arguments. `codebook` is (K, d) or per token (N, K, d)."""
    with torch.autocast(device_type=latents.device.type, enabled=False):
        latents, codebook = latents.float(), codebook.float()
        if codebook.ndim == 3:
            if use_cosine_sim:
                return torch.einsum("nd,nkd->nk", latents, codebook)
            return -(latents.unsqueeze(1) - codebook).pow(2).sum(-1).clamp_min(0).sqrt()
        if use_cosine_sim:
            return latents @ codebook.t()
        return -torch.cdist(latents, codebook)


def topk_codes(
    latents: Tensor, codebook: Tensor, k: int, use_cosine_sim: bool, temperature: float = 0.0
) -> Tensor:
    """(N, k) indices of the k nearest codes, nearest first, without autograd.

    Scores are 2·x·c - |c|² (Euclidean; the negative squared distance up to a per-row
    constant, so the same order as the distance) or x·c (cosine, unit rows): one matmul and
    one `topk`, no square roots. `temperature > 0` (training with `stochastic_sample_codes`,
    as the reference): k codes drawn without replacement from softmax(logits / temperature)
    with `code_logits` (minus the distance, or the dot product), by Gumbel-top-k.
    """
    with torch.no_grad(), torch.autocast(device_type=latents.device.type, enabled=False):
        x, c = latents.detach().float(), codebook.detach().float()
        if temperature > 0:
            logits = code_logits(x, c, use_cosine_sim) / temperature
            return (logits - torch.empty_like(logits).exponential_().log_()).topk(k, -1).indices
        if use_cosine_sim:
            scores = x @ c.t()
        else:
            scores = torch.addmm(-c.pow(2).sum(-1), x, c.t(), beta=1.0, alpha=2.0)
        return scores.topk(k, dim=-1).indices


def directional_reparam(x: Tensor, q: Tensor, variance: float) -> Tensor:
    """DiVeQ (figure 1, openreview KRVnpTbx7R): x + |q - x| · direction, where the direction
    is the (noised, detached) unit error vector; equal to q up to the noise, with gradients
    to x and, through the error's length, to the code."""
    error = q - x
    length = torch.linalg.vector_norm(error, dim=-1, keepdim=True)
    noised = error + math.sqrt(variance) * torch.randn_like(error)
    return x + l2_normalize(noised).detach() * length


def diversity_loss(logits: Tensor, valid: Tensor | None, temperature: float) -> Tensor:
    """Minus the entropy of the average code distribution softmax(logits · temperature) over
    the valid tokens (and heads): low when the batch spreads over the codebook.

    Logits (N, heads, K). The reference averages over batch and heads but not over sequence
    positions, so with batch 1 it rewards every token for being uncertain instead of the
    codebook for being used evenly; this averages over every valid token.
    """
    prob = (logits.float() * temperature).softmax(dim=-1)
    if valid is not None:
        prob = prob * valid.view(-1, 1, 1)
        avg = prob.sum(dim=0) / valid.sum().clamp_min(1)
    else:
        avg = prob.mean(dim=0)
    entropy = -(avg * avg.clamp_min(1e-5).log()).sum(dim=-1)
    return -entropy.mean()


class AffineCodebook(Distributable):
    """Affine re-parameterisation of the codebook (`affine_param=True`): running means and
    variances of the batch latents and of the codes, per codebook; codes are searched and
    returned as (code - codebook_mean) · batch_std / codebook_std + batch_mean, and the EMA
    learns from latents mapped the inverse way. The first step sets a moment, later steps
    take an EMA with `batch_decay` / `codebook_decay`. Batch moments are over valid, finite
    latents; with `sync` they are pooled over ranks through the communicator."""

    def __init__(
        self, num_books: int, dim: int, batch_decay: float, codebook_decay: float, sync: bool
    ) -> None:
        super().__init__()
        for name in ("batch_mean", "batch_variance", "codebook_mean", "codebook_variance"):
            self.register_buffer(name, torch.zeros(num_books, 1, dim))
            self.register_buffer(f"{name}_needs_init", torch.tensor(True))
        self.batch_decay = batch_decay
        self.codebook_decay = codebook_decay
        self.sync = sync

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> AffineCodebook:
        """Keep the running moments float32 when the module is cast (e.g. `.half()`)."""
        super()._apply(fn, recurse)
        for name, buffer in self.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != torch.float32:
                setattr(self, name, buffer.float())
        return self

    def _ema(self, name: str, value: Tensor, decay: float) -> None:
        flag = getattr(self, f"{name}_needs_init")
        old = getattr(self, name)
        rate = torch.where(flag, 1.0, 1.0 - decay)
        old.copy_(old + (value.to(old) - old) * rate)
        flag.fill_(False)

    @torch.no_grad()
    def update(self, pools: Tensor, books: Tensor) -> None:
        """pools (C, M, d) valid latents per codebook; books (C, K, d) the codes."""
        self._ema("codebook_mean", books.mean(dim=1, keepdim=True), self.codebook_decay)
        self._ema(
            "codebook_variance", books.var(dim=1, unbiased=False, keepdim=True), self.codebook_decay
        )
        finite = torch.isfinite(pools).all(dim=-1, keepdim=True)
        clean = torch.where(finite, pools, 0.0)
        count = finite.sum(dim=1, keepdim=True).float()
        total = clean.sum(dim=1, keepdim=True)
        if self.sync:
            packed = self.communicator.all_reduce(torch.cat([count, total], dim=-1), "sum")
            count, total = packed[..., :1], packed[..., 1:]
        if bool((count == 0).any()):
            return  # no latent to learn the batch moments from
        mean = total / count
        spread = torch.where(finite, (clean - mean).pow(2), 0.0).sum(dim=1, keepdim=True)
        if self.sync:
            spread = self.communicator.all_reduce(spread, "sum")
        self._ema("batch_mean", mean, self.batch_decay)
        self._ema("batch_variance", spread / count, self.batch_decay)

    def _stds(self) -> tuple[Tensor, Tensor]:
        return self.codebook_variance.clamp_min(1e-5).sqrt(), self.batch_variance.clamp_min(
            1e-5
        ).sqrt()

    def codes(self, books: Tensor) -> Tensor:
        """(C, K, d) codes as searched and returned."""
        codebook_std, batch_std = self._stds()
        return (books - self.codebook_mean) * (batch_std / codebook_std) + self.batch_mean

    def to_codebook_space(self, latents: Tensor, book: Tensor | int) -> Tensor:
        """(N, heads, d) latents mapped back for the EMA; `book` selects the moments."""
        codebook_std, batch_std = self._stds()
        scale = (codebook_std / batch_std)[book, 0]
        return (latents - self.batch_mean[book, 0]) * scale + self.codebook_mean[book, 0]


def cross_entropy_to_codes(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of (N, heads, K) logits against (N, heads) codes; -1 is ignored."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1
    )


def in_place_optimizer(factory: object, module: nn.Module) -> torch.optim.Optimizer | None:
    """The in-place codebook optimizer built by `factory(parameters)` (None when no factory)."""
    if factory is None:
        return None
    if not callable(factory):
        raise TypeError("in_place_codebook_optimizer must be a callable params -> Optimizer")
    params = [p for name, p in module.named_parameters(recurse=False) if name == "embed"]
    bridge = getattr(module, "vq_bridge", None)
    if not params:
        raise ValueError(
            "in_place_codebook_optimizer needs a learnable codebook: pass "
            "learnable_codebook=True (and usually ema_update=False)"
        )
    if bridge is not None:  # the bridge shapes the codebook, so it learns with it
        params += list(bridge.parameters())
    return factory(params)


def check_option_keywords(
    *,
    rotation_trick: bool,
    straight_through: bool,
    directional_reparam: bool,
    threshold_ema_dead_code: float,
    learnable_codebook: bool,
    vq_bridge: nn.Module | None,
    ema_update: bool,
    sync_update_v: float,
    affine_param: bool,
    use_cosine_sim: bool,
    codebook_diversity_loss_weight: float,
) -> None:
    """Refuse combinations of VectorQuantize keywords that cannot work, naming the fix."""
    if sum((rotation_trick, straight_through, directional_reparam)) > 1:
        raise ValueError(
            "pick at most one of rotation_trick, straight_through and directional_reparam "
            f"(got {rotation_trick}, {straight_through}, {directional_reparam}); pass "
            "rotation_trick=False with the other two"
        )
    if directional_reparam and threshold_ema_dead_code <= 0:
        raise ValueError(
            "directional_reparam needs dead-code revival: pass threshold_ema_dead_code > 0 "
            "(e.g. 2), as the reference requires"
        )
    if straight_through and learnable_codebook:
        raise ValueError("straight_through (Gumbel) does not combine with learnable_codebook")
    if vq_bridge is not None and (not learnable_codebook or ema_update):
        raise ValueError("vq_bridge needs learnable_codebook=True and ema_update=False")
    if not 0.0 <= sync_update_v <= 1.0:
        raise ValueError(f"sync_update_v must lie in [0, 1], got {sync_update_v}")
    if sync_update_v > 0 and not learnable_codebook:
        raise ValueError(
            "sync_update_v > 0 updates the codebook by gradient: pass learnable_codebook=True"
        )
    if affine_param and use_cosine_sim:
        raise ValueError(
            "affine_param works with the Euclidean codebook only (use_cosine_sim=False)"
        )
    if codebook_diversity_loss_weight < 0:
        raise ValueError("codebook_diversity_loss_weight must be >= 0")
