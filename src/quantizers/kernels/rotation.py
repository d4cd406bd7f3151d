"""Gradient estimators that pass the decoder's gradient through the non-differentiable lookup.

Both return a tensor whose forward value is exactly `q`, so a quantizer's output equals the
codes it decodes from indices; only the backward pass differs. Both are autograd Functions
whose forward costs nothing (the output is a view of `q`) and whose backward is a handful of
per-row reductions: no (N, D, D) rotation matrix and no forward-time arithmetic is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from src.quantizers.kernels.nearest import NORM_EPS

# 1 + cos(e, q) below this counts as antipodal: the rotation plane is then undefined (float32
# rounding alone puts ~1e-7 of noise on it) and the map falls back to the reflection I - 2uuᵀ.
ANTIPODAL_TOL = 1e-4


def _rows_dot(a: Tensor, b: Tensor) -> Tensor:
    # einsum lowers to a batched matmul, one read of each operand; vecdot (and (a*b).sum)
    # materialises the product first and costs about twice as much on CPU.
    return torch.einsum("...d,...d->...", a, b).unsqueeze(-1)


def rotation_grad(e: Tensor, q: Tensor, g: Tensor) -> Tensor:
    """(λR)ᵀ g per row, with R = I - 2rrᵀ + 2wuᵀ, λ = |q|/|e| (see `rotate_to`).

    With a = g·u, b = g·w, c = u·w and |u + w|² = 2 + 2c this is
    λ g + e·|q|(2b - s)/|e|² - q·s/|e| where s = 2(a + b)/(2 + 2c), so it needs only five
    row dot products and one fused combination. Rows with a (near) zero e or q get g back.
    """
    e_sq, q_sq = _rows_dot(e, e), _rows_dot(q, q)
    e_norm, q_norm = e_sq.sqrt(), q_sq.sqrt()
    ok = (e_norm > NORM_EPS) & (q_norm > NORM_EPS)
    e_norm = e_norm.clamp_min(NORM_EPS)
    q_norm = q_norm.clamp_min(NORM_EPS)
    a = _rows_dot(g, e) / e_norm
    b = _rows_dot(g, q) / q_norm
    one_plus_c = 1.0 + _rows_dot(e, q) / (e_norm * q_norm)
    s = torch.where(one_plus_c > ANTIPODAL_TOL, (a + b) / one_plus_c.clamp_min(ANTIPODAL_TOL), 0.0)
    lam = torch.where(ok, q_norm / e_norm, 1.0)
    coef_e = torch.where(ok, q_norm * (2.0 * b - s) / (e_norm * e_norm), 0.0)
    coef_q = torch.where(ok, -s / e_norm, 0.0)
    return torch.addcmul(torch.addcmul(lam * g, coef_e, e), coef_q, q)


class _RotateTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e: Tensor, q: Tensor) -> Tensor:
        ctx.save_for_backward(e.detach(), q)
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:
        e, q = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        with torch.autocast(device_type=grad.device.type, enabled=False):
            out = rotation_grad(e.float(), q.float(), grad.float())
        return out.to(e.dtype), None


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e: Tensor, q: Tensor) -> Tensor:
        ctx.e_dtype = e.dtype
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.to(ctx.e_dtype), None


def straight_through(e: Tensor, q: Tensor) -> Tensor:
    """Straight-through estimator: value `q`, gradient w.r.t. `e` equal to the output gradient."""
    return _StraightThrough.apply(e, q.detach())


def rotate_to(e: Tensor, q: Tensor) -> Tensor:
    """Rotation trick (Fifty et al. 2024, arXiv 2410.06424) along the last dim.

    The value is `q`; the gradient reaching `e` is the output gradient mapped through the
    constant linear map λR that takes `e` onto `q`, where u = e/|e|, w = q/|q|,
    r = (u + w)/|u + w|, R = I - 2rrᵀ + 2wuᵀ and λ = |q|/|e|. Where `e` or `q` is (near)
    zero the rotation is undefined and the token falls back to straight-through; where they
    are antipodal R is the reflection I - 2uuᵀ. `q` gets no gradient.
    """
    return _RotateTo.apply(e, q.detach())


class _CosineRotateCommit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, unit, scale, q, weight):  # type: ignore[override]
        ctx.save_for_backward(unit, q, scale)
        ctx.weight = weight
        ctx.x_dtype = x.dtype
        return q.view_as(q), F.mse_loss(unit, q) * weight

    @staticmethod
    def backward(ctx, grad_out, grad_loss):  # type: ignore[override]
        unit, q, scale = ctx.saved_tensors
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            g = grad_out.float()
            # commitment: d/du of weight·mean((u - q)²) is k·(u - q)
            k = grad_loss.float() * (2.0 * ctx.weight / unit.numel())
            a, b, c = _rows_dot(g, unit), _rows_dot(g, q), _rows_dot(unit, q)
            # a zero code q needs no special case: g - a·u is what straight-through leaves
            # once the radial part is dropped
            moving = scale > NORM_EPS
            s = torch.where(
                1.0 + c > ANTIPODAL_TOL, (a + b) / (1.0 + c).clamp_min(ANTIPODAL_TOL), 0.0
            )
            # gradient at the unit vector: g + alpha·u - beta·q (rotation trick for |u| = |q| = 1)
            alpha = torch.where(moving, 2.0 * b - s, 0.0) + k
            beta = torch.where(moving, s, 0.0) + k
            # through u = x/|x|: drop the radial part u(u·g_u), then divide by |x|
            radial = torch.where(moving, a + alpha - beta * c, 0.0)
            inv = scale.reciprocal()
            grad_x = (g * inv).addcmul_(unit, (alpha - radial) * inv)
            grad_x.addcmul_(q, beta * inv, value=-1.0)  # in place: one row-sized temporary
        return grad_x.to(ctx.x_dtype), None, None, None, None


def cosine_rotate_commit(
    x: Tensor, unit: Tensor, scale: Tensor, q: Tensor, weight: float
) -> tuple[Tensor, Tensor]:
    """`rotate_to(unit_rows(x), q)` and `weight · mse(unit_rows(x), q)` as one autograd node.

    For cosine codebooks, where both the normalised latent `unit` (= x / scale, from
    `unit_rows_and_scale`) and the code `q` are unit rows, the rotation needs no norms, and
    the gradients of the rotation, the commitment loss and the normalisation combine into
    g/|x| + α·u - β·q per row from three row dot products: about half the passes over the
    rows of the three separate nodes. Rows whose latent norm is at most NORM_EPS fall back to
    straight-through (`rotate_to` would still rotate a nonzero latent that short).
    Returns (output with the value of `q`, loss).
    """
    return _CosineRotateCommit.apply(x, unit, scale, q.detach(), float(weight))
