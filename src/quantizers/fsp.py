"""Finite Scalar Perturbation (FSP, the VP-VAE tokenizer's bottleneck, arXiv 2602.17133).

Each of `len(levels)` channels goes through a CDF-shaped activation into (0, 1) and is cut into
`L` equal bins whose midpoints are the codes. In training a token's value is, for a fraction
`1 - quantize_rate` of its elements, the activation plus uniform noise of up to half a bin
(kept inside (0, 1)) instead of the bin midpoint: a perturbation that stands in for the
rounding. A moment-matching loss (`vector_norm`) pulls the batch statistics of the
pre-activation latents towards targets (mean 0, variance 1, ...). The indices are the
mixed-radix numbers of the bins (first level fastest), int32 as in the reference.

Statistics and the quantization run in float32 under autocast; a token with a NaN or inf
channel gets index -1 and is left out of the moment statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from src.quantizers.contract import MASKED, QuantizerContract, check_index_range
from src.quantizers.float_input import check_float_input, like_input, project
from src.quantizers.registry import register_quantizer

_UNIT_UNIFORM_STD = 0.28867513459481287  # std of U(0, 1) = 1/sqrt(12): codes get variance ~1
_MAX_INT32_CODES = 2**31  # indices are int32 (the reference's dtype)

Activation = Callable[[Tensor], Tensor]


def _tanh(z: Tensor) -> Tensor:
    return (torch.tanh(z) + 1.0) / 2.0


def _tanh_inv(p: Tensor) -> Tensor:
    return torch.atanh(p * 2.0 - 1.0)


def _normal(z: Tensor) -> Tensor:
    return (1.0 + torch.erf(z / math.sqrt(2.0))) / 2.0


def _normal_inv(p: Tensor) -> Tensor:
    return torch.erfinv(2.0 * p - 1.0) * math.sqrt(2.0)


def _laplace(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.sign(z) * (1.0 - torch.exp(-torch.abs(z))))


def _laplace_inv(p: Tensor) -> Tensor:
    centred = p - 0.5
    return -torch.sign(centred) * torch.log(1.0 - 2.0 * torch.abs(centred))


def _cauchy(z: Tensor) -> Tensor:
    return torch.atan(z) / math.pi + 0.5


def _cauchy_inv(p: Tensor) -> Tensor:
    return torch.tan((p - 0.5) * math.pi)


CDF_ACTIVATIONS: dict[str, tuple[Activation, Activation]] = {
    "tanh": (_tanh, _tanh_inv),
    "sigmoid": (torch.sigmoid, torch.logit),
    "normal": (_normal, _normal_inv),
    "laplace": (_laplace, _laplace_inv),
    "cauchy": (_cauchy, _cauchy_inv),
}


def build_cdf_act(act_name: str) -> tuple[Activation, Activation]:
    """(activation onto (0, 1), its inverse) for one of `CDF_ACTIVATIONS`."""
    if act_name not in CDF_ACTIVATIONS:
        raise ValueError(
            f"unknown CDF activation {act_name!r}; choose one of {sorted(CDF_ACTIVATIONS)}"
        )
    return CDF_ACTIVATIONS[act_name]


# (l1 target, l1 weight, l2 target, l2 weight, l3 target, l3 weight, l4 target, l4 weight):
# targets and weights of the mean, variance, skewness and excess kurtosis terms
VECTOR_NORM_PRESETS: dict[str, tuple[float, ...]] = {
    "none": (0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "var": (0.0, 0.1, 1.0, 0.07, 0.0, 0.0, 0.0, 0.0),
    "kurt": (0.0, 0.1, 1.0, 0.07, 0.0, 0.06, 0.0, 0.05),
    "var_tanh": (0.0, 0.1, 0.8225, 0.07, 0.0, 0.0, 0.0, 0.0),
    "var_sigmoid": (0.0, 0.1, 3.29, 0.07, 0.0, 0.0, 0.0, 0.0),
    "var_laplace": (0.0, 0.1, 2.0, 0.07, 0.0, 0.0, 0.0, 0.0),
}


def batch_moments(z: Tensor, valid: Tensor | None = None, eps: float = 1e-8) -> list[Tensor]:
    """Per-channel mean, unbiased variance, skewness and excess kurtosis of rows `z` (N, C),
    over the rows where `valid` (N,) holds (all when None), without a host sync."""
    if valid is None:
        variance, mean = torch.var_mean(z, dim=0, unbiased=True)
        standard = (z - mean) / variance.sqrt().clamp_min(eps)
        return [mean, variance, standard.pow(3).mean(0), standard.pow(4).mean(0) - 3.0]
    weight = valid.unsqueeze(-1).to(z.dtype)
    z = torch.where(valid.unsqueeze(-1), z, 0.0)
    count = weight.sum(0)
    mean = z.sum(0) / count
    centred = (z - mean) * weight
    variance = centred.pow(2).sum(0) / (count - 1)
    standard = centred / variance.sqrt().clamp_min(eps)
    skewness = standard.pow(3).sum(0) / count
    return [mean, variance, skewness, standard.pow(4).sum(0) / count - 3.0]


class VectorNorm(nn.Module):
    """Moment-matching loss: weighted squared distances of the batch moments to targets."""

    def __init__(
        self,
        l1_target: float = 0.0,
        l1_weight: float = 0.1,
        l2_target: float = 1.0,
        l2_weight: float = 0.07,
        l3_target: float = 0.0,
        l3_weight: float = 0.06,
        l4_target: float = 0.0,
        l4_weight: float = 0.05,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.targets = (l1_target, l2_target, l3_target, l4_target)
        self.weights = (l1_weight, l2_weight, l3_weight, l4_weight)
        self.eps = eps

    @classmethod
    def build(cls, name: str) -> VectorNorm:
        if name not in VECTOR_NORM_PRESETS:
            raise ValueError(
                f"unknown vector_norm preset {name!r}; choose one of {sorted(VECTOR_NORM_PRESETS)}"
            )
        values = VECTOR_NORM_PRESETS[name]
        keys = [f"l{i}_{kind}" for i in range(1, 5) for kind in ("target", "weight")]
        return cls(**dict(zip(keys, values, strict=True)))

    def forward(self, z: Tensor, valid: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, moments) of rows `z` (N, C) in float32."""
        moments = batch_moments(z.float(), valid, self.eps)
        loss = z.new_zeros((), dtype=torch.float32)
        for moment, target, weight in zip(moments, self.targets, self.weights, strict=True):
            loss = loss + ((moment - target) ** 2).mean() * weight
        names = ("mean", "variance", "skewness", "kurtosis")
        return loss, dict(zip(names, moments, strict=True))


class FSPOutput(NamedTuple):
    """The reference's tuple: `quantized` in the input's layout and dtype; `indices` int32
    (-1 for a non-finite token); `norm_loss` a float32 scalar; `info` the level indices,
    the moments (`norm_info`) and, when perturbing, `p_accept_prob`."""

    quantized: Tensor
    indices: Tensor
    norm_loss: Tensor
    info: dict[str, Any]


@register_quantizer("fsp")
class FSP(nn.Module, QuantizerContract):
    """Finite scalar perturbation with the reference library's keywords and output tuple.

    Input is channel-last `(..., dim)`, or `(batch, dim, *spatial)` with `channel_first=True`.
    `dim` defaults to `len(levels)`; otherwise linear projections map to and from it.
    `need_inv_act=True` maps the bin midpoints back through the activation's inverse (with a
    straight-through gradient); otherwise the codes are the midpoints standardised to
    variance ~1.
    """

    num_codebooks = 1

    def __init__(
        self,
        levels: list[int] | tuple[int, ...],
        dim: int | None = None,
        channel_first: bool = False,
        projection_has_bias: bool = True,
        act_name: str = "tanh",
        quantize_rate: float = 0.0,
        need_inv_act: bool = False,
        vector_norm: str = "var_tanh",
    ) -> None:
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"FSP levels must be a non-empty list of ints >= 2; got {levels}")
        if not 0.0 <= quantize_rate <= 1.0:
            raise ValueError(f"quantize_rate must be in [0, 1]; got {quantize_rate}")
        self.codebook_size: int = math.prod(levels)
        if self.codebook_size > _MAX_INT32_CODES:
            raise ValueError(
                f"FSP levels {levels} give {self.codebook_size} codes; its int32 indices hold "
                f"at most 2^31: use fewer or smaller levels"
            )
        self.levels = levels
        self.codebook_dim = len(levels)
        self.dim = self.codebook_dim if dim is None else dim
        self.channel_first = channel_first
        self.act_name = act_name
        self.act_func, self.inv_act_func = build_cdf_act(act_name)
        self.need_inv_act = need_inv_act
        self.quantize_rate = quantize_rate
        self.vector_norm = VectorNorm.build(vector_norm)

        self.has_projections = self.dim != self.codebook_dim
        if self.has_projections:
            self.project_in: nn.Module = nn.Linear(self.dim, len(levels), projection_has_bias)
            self.project_out: nn.Module = nn.Linear(len(levels), self.dim, projection_has_bias)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int32), persistent=False)

    # -- indices ------------------------------------------------------------------------------

    def level_indices_to_indices(self, level_indices: Tensor) -> Tensor:
        """Per-channel bins (..., len(levels)) -> int32 mixed-radix indices (...)."""
        return (level_indices.long() * self._basis.long()).sum(dim=-1).to(torch.int32)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """Int indices (...) -> per-channel bins (..., len(levels))."""
        digits = indices.unsqueeze(-1) // self._basis
        return digits % self._levels

    def indices_to_act_value(self, indices: Tensor) -> Tensor:
        """Bin midpoints in (0, 1) (..., len(levels)) of int indices (...)."""
        levels = self._levels.float()
        return (self.indices_to_level_indices(indices).float() + 0.5) / levels

    def _codes_from_act(self, act: Tensor, eps: float) -> Tensor:
        """Code values of activations in (0, 1) (no gradient bookkeeping)."""
        if self.need_inv_act:
            return self.inv_act_func(act.clamp(eps, 1.0 - eps))
        return (act - 0.5) / _UNIT_UNIFORM_STD

    def indices_to_codes(self, indices: Tensor, eps: float = 1e-6) -> Tensor:
        """Decode indices as `forward` returned them into its eval output, in the input layout;
        -1 (a non-finite token) decodes to zeros."""
        check_index_range(indices, self.codebook_size, self, allow_masked=True)
        codes = self._codes_from_act(self.indices_to_act_value(indices.clamp_min(0)), eps)
        codes = project(self.project_out, codes.to(self._project_dtype()))
        codes = codes.masked_fill((indices == MASKED).unsqueeze(-1), 0.0)
        return codes.movedim(-1, 1) if self.channel_first else codes

    def decode_indices(self, indices: Tensor) -> Tensor:
        """The contract's decode (src/quantizers/contract.py)."""
        return self.indices_to_codes(indices, eps=torch.finfo(torch.float32).eps)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, z: Tensor, eps: float | None = None) -> FSPOutput:
        check_float_input(z, "FSP")
        if self.channel_first:
            if z.ndim < 2 or z.shape[1] != self.dim:
                raise ValueError(
                    f"FSP(channel_first=True) expects (batch, dim={self.dim}, ...); "
                    f"got {tuple(z.shape)}"
                )
            z = z.movedim(1, -1)
        elif z.ndim < 1 or z.shape[-1] != self.dim:
            raise ValueError(
                f"FSP expects channel-last input (..., dim={self.dim}); got {tuple(z.shape)}; "
                f"build with channel_first=True for (batch, dim, height, width) maps"
            )
        given = z
        latents = project(self.project_in, z)
        out_dtype = latents.dtype
        with torch.autocast(z.device.type, enabled=False):
            work = latents if latents.dtype == torch.float64 else latents.float()
            codes, level_indices, loss, info = self._quantize(work, eps)
        codes = codes.to(out_dtype) if torch.is_autocast_enabled(z.device.type) else codes
        quantized = like_input(project(self.project_out, codes), given)
        if self.channel_first:
            quantized = quantized.movedim(-1, 1)
        indices = self.level_indices_to_indices(level_indices)
        finite = torch.isfinite(latents).all(dim=-1)
        indices = indices.masked_fill(~finite, MASKED)
        info = {"level_indices": level_indices, **info}
        return FSPOutput(quantized, indices, loss, info)

    def _quantize(
        self, z: Tensor, eps: float | None
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
        """(codes, level indices, norm loss, info) of latents `z` (..., len(levels))."""
        eps = eps or torch.finfo(z.dtype).eps
        rows = z.reshape(-1, self.codebook_dim)
        finite = torch.isfinite(rows).all(dim=-1)
        loss, moments = self.vector_norm(rows, finite)
        levels = self._levels.to(z.dtype)
        act = self.act_func(z)
        safe = torch.where(torch.isfinite(act), act, 0.5)  # NaN bins would cast to garbage
        level_indices = (safe.detach().clamp_max(1.0 - eps) * levels).floor()
        value = (level_indices + 0.5) / levels  # bin midpoints
        info: dict[str, Any] = {"norm_info": moments}
        quantize_rate = self.quantize_rate if self.training else 1.0
        if quantize_rate < 1.0:
            noise = (torch.rand_like(act) * 2.0 - 1.0) / (2.0 * levels)
            proposal = act.detach() + noise
            accepted = (proposal > 0.0) & (proposal < 1.0)
            info["p_accept_prob"] = accepted.float().mean()
            perturbed = torch.where(accepted, proposal, act.detach())
            value = torch.where(torch.rand_like(act) > quantize_rate, perturbed, value)
        if self.need_inv_act:
            codes = self._codes_from_act(value, eps)
            codes = codes + (z - z.detach())  # value `codes`, gradient straight to z
        else:
            value = value + (act - act.detach())  # value `value`, gradient through act
            codes = (value - 0.5) / _UNIT_UNIFORM_STD
        return codes, level_indices.long().to(torch.int32), loss, info

    def _project_dtype(self) -> torch.dtype:
        weight = getattr(self.project_out, "weight", None)
        return weight.dtype if weight is not None else torch.float32
