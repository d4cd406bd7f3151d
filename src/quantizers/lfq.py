"""Lookup-free quantization (MAGVIT-v2, Yu et al. 2023, arXiv 2310.05737) and binary
spherical quantization (BSQ, Zhao et al. 2024, arXiv 2406.07548, `spherical=True`).

Each of the `d = log2(codebook_size)` channels of a codebook is quantized to its sign, so the
codebook is the implicit set `{-s, +s}^d` (BSQ: the input is first projected to the sphere
of radius `codebook_scale`, and codes are `+-codebook_scale / sqrt(d)`). The index of a code
reads its bits most-significant first. In training the entropy loss
`per_sample_entropy - diversity_gamma * batch_entropy` is computed from per-bit logits
(src/quantizers/kernels/entropy.py), never from the 2^d codes, so 2^32-code BSQ trains.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.quantizers.collectives import differentiable_all_reduce_sum
from src.quantizers.communicator import Distributable
from src.quantizers.contract import QuantizerContract, check_index_range
from src.quantizers.float_input import check_float_input, like_input, project
from src.quantizers.kernels.entropy import (
    MAX_EXACT_BITS,
    batch_entropy,
    bit_logits,
    per_sample_entropy,
)
from src.quantizers.reference_checkpoint import register_reference_keys
from src.quantizers.registry import register_quantizer

MAX_CODEBOOK_BITS = 62  # int64 indices
MAX_MATERIALISED_BITS = 20  # `codebook` (all codes) is refused beyond 2^20 codes


class LFQOutput(NamedTuple):
    """The reference's tuple order; `loss` aliases `entropy_aux_loss` for the framework;
    `indices` is -1 where the token (its codebook's channels) is not finite."""

    quantized: Tensor
    indices: Tensor
    entropy_aux_loss: Tensor

    @property
    def loss(self) -> Tensor:
        return self.entropy_aux_loss


class LFQLossBreakdown(NamedTuple):
    per_sample_entropy: Tensor
    batch_entropy: Tensor
    commitment: Tensor


class CosineSimLinear(nn.Module):
    """Linear map between unit-normalised inputs and unit-norm weight columns, times `scale`."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return (F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)) * self.scale


def _codebook_bits(codebook_size: int | None, dim: int | None, num_codebooks: int) -> int:
    if codebook_size is None:
        if dim is None:
            raise ValueError("LFQ needs `codebook_size` (a power of two) or `dim`")
        if dim % num_codebooks:
            raise ValueError(f"LFQ dim={dim} is not divisible by num_codebooks={num_codebooks}")
        return dim // num_codebooks
    bits = int(codebook_size).bit_length() - 1
    if codebook_size < 2 or 2**bits != codebook_size:
        suggested = 2 ** math.ceil(math.log2(max(codebook_size, 2)))
        raise ValueError(
            f"LFQ codebook_size must be a power of two; got {codebook_size} (suggested {suggested})"
        )
    return bits


@register_quantizer("lfq")
class LFQ(Distributable, QuantizerContract):
    """Sign quantization of `num_codebooks` groups of `log2(codebook_size)` channels.

    Input: a sequence `(batch, seq, dim)`, or a channel-first image/video map
    `(batch, dim, *spatial)` (4-D/5-D inputs; override with `channel_first`). Returns
    `LFQOutput(quantized, indices, entropy_aux_loss)`: indices `(batch, ...)` or
    `(batch, ..., num_codebooks)`, int64; the loss is a scalar, 0 outside training.
    """

    def __init__(
        self,
        *,
        dim: int | None = None,
        codebook_size: int | None = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.0,
        diversity_gamma: float = 1.0,
        straight_through_activation: nn.Module | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        codebook_scale: float = 1.0,
        frac_per_sample_entropy: float = 1.0,
        has_projections: bool | None = None,
        projection_has_bias: bool = True,
        soft_clamp_input_value: float | None = None,
        cosine_sim_project_in: bool = False,
        cosine_sim_project_in_scale: float | None = None,
        channel_first: bool | None = None,
        experimental_softplus_entropy_loss: bool = False,
        entropy_loss_offset: float = 5.0,
        spherical: bool = False,
        force_quantization_f32: bool = True,
        orthogonal_rotation: bool = False,
        max_exact_entropy_bits: int = MAX_EXACT_BITS,
        inv_temperature: float = 100.0,
    ) -> None:
        super().__init__()
        if num_codebooks < 1:
            raise ValueError(f"num_codebooks must be >= 1; got {num_codebooks}")
        bits = _codebook_bits(codebook_size, dim, num_codebooks)
        if bits > MAX_CODEBOOK_BITS:
            raise ValueError(f"LFQ supports at most 2^{MAX_CODEBOOK_BITS} codes; got 2^{bits}")
        if not 0 < frac_per_sample_entropy <= 1:
            raise ValueError(
                f"frac_per_sample_entropy must be in (0, 1]; got {frac_per_sample_entropy}"
            )
        if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
            raise ValueError("soft_clamp_input_value must be >= codebook_scale")
        self.codebook_size: int = 2**bits
        self.codebook_dim = bits
        self.num_codebooks = num_codebooks
        codebook_dims = bits * num_codebooks
        self.dim = codebook_dims if dim is None else dim
        if has_projections is None:
            has_projections = self.dim != codebook_dims
        elif not has_projections and self.dim != codebook_dims:
            raise ValueError(
                f"LFQ dim={self.dim} must equal log2(codebook_size) * num_codebooks = "
                f"{bits} * {num_codebooks} = {codebook_dims} when has_projections=False"
            )
        self.has_projections = has_projections
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim=False needs num_codebooks=1")
        self.keep_num_codebooks_dim = keep_num_codebooks_dim

        self.project_in: nn.Module = nn.Identity()
        self.project_out: nn.Module = nn.Identity()
        if has_projections:
            if cosine_sim_project_in:
                scale = (
                    codebook_scale
                    if cosine_sim_project_in_scale is None
                    else cosine_sim_project_in_scale
                )
                self.project_in = CosineSimLinear(self.dim, codebook_dims, scale)
            else:
                self.project_in = nn.Linear(self.dim, codebook_dims, bias=projection_has_bias)
            self.project_out = nn.Linear(codebook_dims, self.dim, bias=projection_has_bias)

        self.entropy_loss_weight = entropy_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.diversity_gamma = diversity_gamma
        self.activation = straight_through_activation or nn.Identity()
        self.codebook_scale = codebook_scale
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.soft_clamp_input_value = soft_clamp_input_value
        self.channel_first = channel_first
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.entropy_loss_offset = entropy_loss_offset
        self.spherical = spherical
        self.force_quantization_f32 = force_quantization_f32
        self.max_exact_entropy_bits = max_exact_entropy_bits
        self.inv_temperature = inv_temperature  # used when a call passes none (configs set it)
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            self.register_buffer("orthogonal_rot", nn.init.orthogonal_(torch.empty(bits, bits)))
        weights = 2 ** torch.arange(bits - 1, -1, -1, dtype=torch.int64)  # MSB first
        self.register_buffer("_bit_weights", weights, persistent=False)
        register_reference_keys(self)  # the reference library's checkpoints load too

    # -- codes -------------------------------------------------------------------------------

    @property
    def code_value(self) -> float:
        """Magnitude of every code coordinate: s, or s / sqrt(d) on the sphere (BSQ)."""
        if self.spherical:
            return self.codebook_scale / math.sqrt(self.codebook_dim)
        return self.codebook_scale

    def _codes_from_signs(self, positive: Tensor, dtype: torch.dtype) -> Tensor:
        value = torch.tensor(self.code_value, dtype=dtype, device=positive.device)
        return torch.where(positive, value, -value)

    def _maybe_sphere(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) * self.codebook_scale if self.spherical else x

    @property
    def codebook(self) -> Tensor:
        """All codes (codebook_size, codebook_dim), built on demand; refused past 2^20 codes."""
        if self.codebook_dim > MAX_MATERIALISED_BITS:
            raise ValueError(
                f"refusing to materialise 2^{self.codebook_dim} codes; LFQ never needs them"
            )
        indices = torch.arange(self.codebook_size, device=self._bit_weights.device)
        positive = (indices.unsqueeze(-1) & self._bit_weights) != 0
        return self._codes_from_signs(positive, torch.float32)

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """Codes of int indices as `forward` returned them, in the layout `forward` returned;
        -1 (the index forward gives a non-finite token) decodes to zeros."""
        channel_dims = 1 if self.keep_num_codebooks_dim else 0
        is_map = indices.ndim >= 3 + channel_dims
        transpose = is_map if self.channel_first is None else self.channel_first
        if self.keep_num_codebooks_dim:
            if indices.shape[-1] != self.num_codebooks:
                raise ValueError(
                    f"LFQ indices must end with num_codebooks={self.num_codebooks}; "
                    f"got {tuple(indices.shape)}"
                )
        else:
            indices = indices.unsqueeze(-1)
        check_index_range(indices, self.codebook_size, self, allow_masked=True)
        positive = (indices.long().clamp_min(0).unsqueeze(-1) & self._bit_weights) != 0
        codes = self._codes_from_signs(positive, torch.float32)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        codes = codes.masked_fill((indices < 0).any(-1, keepdim=True), 0.0)
        return codes.movedim(-1, 1) if transpose else codes

    def decode_indices(self, indices: Tensor) -> Tensor:
        """The contract's decode: `indices_to_codes` with the output projection."""
        return self.indices_to_codes(indices)

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        inv_temperature: float | None = None,
        return_loss_breakdown: bool = False,
        mask: Tensor | None = None,
    ) -> LFQOutput | tuple[LFQOutput, LFQLossBreakdown]:
        check_float_input(x, "LFQ")
        given = x
        transpose = x.ndim >= 4 if self.channel_first is None else self.channel_first
        spatial: tuple[int, ...] = ()
        if transpose:
            if x.ndim < 3 or x.shape[1] != self.dim:
                raise ValueError(
                    f"LFQ expects a channel-first map (batch, dim={self.dim}, ...); "
                    f"got {tuple(x.shape)}"
                )
            spatial = tuple(x.shape[2:])
            x = x.flatten(2).transpose(1, 2)
        elif x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"LFQ expects a sequence (batch, seq, dim={self.dim}) or a channel-first "
                f"image/video map (batch, dim={self.dim}, ...); got {tuple(x.shape)}"
            )
        batch, tokens = x.shape[:2]
        if mask is not None:
            if mask.ndim == 1 and mask.shape[0] == batch:  # (batch,): whole samples, as the
                mask = mask.unsqueeze(-1).expand(batch, tokens)  # reference's boolean index
            if mask.ndim == 0 or mask.shape[0] != batch or mask[0].numel() != tokens:
                raise ValueError(
                    f"LFQ mask must be (batch,), (batch, seq) or (batch, *spatial) = {batch} x "
                    f"{tokens} tokens (True = used by the entropy and commitment losses); got "
                    f"{tuple(mask.shape)}"
                )
            mask = mask.reshape(batch, tokens).bool()

        x = project(self.project_in, x)
        if self.soft_clamp_input_value is not None:
            clamp = self.soft_clamp_input_value
            x = (x / clamp).tanh() * clamp
        x = x.unflatten(-1, (self.num_codebooks, self.codebook_dim))
        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot

        f32 = self.force_quantization_f32
        orig_dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False) if f32 else nullcontext():
            if f32 and x.dtype not in (torch.float32, torch.float64):
                x = x.float()
            x = self._maybe_sphere(x)
            positive = x > 0
            codes = self._codes_from_signs(positive, x.dtype)
            indices = (positive.long() * self._bit_weights).sum(dim=-1)
            # a non-finite token (NaN, inf) has no code: -1, not the code of its signs
            indices = indices.masked_fill_(~torch.isfinite(x).all(dim=-1), -1)
            if self.training:
                active = self.activation(x)
                out = codes + (active - active.detach())  # exactly `codes`, identity gradient
            else:
                out = codes
            if inv_temperature is None:
                inv_temperature = self.inv_temperature
            losses = self._losses(x, codes, mask, inv_temperature)
            out = out.to(orig_dtype)

        if self.orthogonal_rotation:
            out = out @ self.orthogonal_rot.t()
        out = like_input(project(self.project_out, out.flatten(-2)), given)
        if transpose:
            out = out.transpose(1, 2).unflatten(2, spatial)
            indices = indices.unflatten(1, spatial)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        aux = losses[0] * self.entropy_loss_weight + losses[3] * self.commitment_loss_weight
        result = LFQOutput(out, indices, aux)
        if return_loss_breakdown:
            return result, LFQLossBreakdown(losses[1], losses[2], losses[3])
        return result

    def _losses(
        self, x: Tensor, codes: Tensor, mask: Tensor | None, inv_temperature: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(entropy aux loss, per-sample entropy, batch entropy, commitment) on kept tokens."""
        zero = x.new_zeros(())
        if not self.training:
            return zero, zero, zero, zero
        kept = x if mask is None else x[mask]  # (tokens, codebooks, bits)
        kept = kept.reshape(-1, self.num_codebooks, self.codebook_dim)
        commit = zero
        if self.commitment_loss_weight > 0:
            target = codes if mask is None else codes[mask]
            commit = F.mse_loss(kept, target.reshape_as(kept).detach())
        if self.frac_per_sample_entropy < 1:
            count = int(kept.shape[0] * self.frac_per_sample_entropy)
            kept = kept[torch.randperm(kept.shape[0], device=kept.device)[:count]]
        distributed = self.communicator.world_size > 1
        if kept.shape[0] == 0 and not distributed:  # ranks must still join the all-reduce
            return zero, zero, zero, commit
        logits = bit_logits(kept, inv_temperature, self.code_value).transpose(0, 1)
        sample = per_sample_entropy(logits).mean() if kept.shape[0] else zero
        reduce_sum = None
        if distributed:
            comm = self.communicator
            reduce_sum = lambda t: differentiable_all_reduce_sum(t, comm)  # noqa: E731
        codebook = batch_entropy(logits, self.max_exact_entropy_bits, reduce_sum).mean()
        aux = sample - self.diversity_gamma * codebook
        if self.experimental_softplus_entropy_loss:
            aux = F.softplus(aux + self.entropy_loss_offset)
        return aux, sample, codebook, commit


@register_quantizer("bsq_huge")
@register_quantizer("bsq")
class BSQ(LFQ):
    """`LFQ(spherical=True)`: binary spherical quantization, codes on the unit sphere.

    Registered as `bsq` and as `bsq_huge` (its config uses 2^32 codes) so that every quantizer
    config in configs/quantizer/ names its own registry entry.
    """

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("spherical", True)
        super().__init__(**kwargs)
