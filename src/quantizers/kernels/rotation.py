"""Gradient estimators that pass the decoder's gradient through the non-differentiable lookup.

Both return a tensor whose forward value is exactly `q`, so a quantizer's output equals the
codes it decodes from indices; only the backward pass differs.
"""

from __future__ import annotations

from torch import Tensor

from src.quantizers.kernels.nearest import NORM_EPS


def straight_through(e: Tensor, q: Tensor) -> Tensor:
    """Straight-through estimator: value `q`, gradient w.r.t. `e` equal to the output gradient."""
    return q.detach() + (e - e.detach())


def rotate_to(e: Tensor, q: Tensor) -> Tensor:
    """Rotation trick (Fifty et al. 2024, arXiv 2410.06424) along the last dim.

    The value is `q`; the gradient reaching `e` is the output gradient mapped through the
    constant linear map λR that takes `e` onto `q`, where u = e/|e|, w = q/|q|,
    r = (u + w)/|u + w|, R = I - 2rrᵀ + 2wuᵀ and λ = |q|/|e|. Where `e` or `q` is (near)
    zero the rotation is undefined and the token falls back to straight-through.
    """
    e_det, q_det = e.detach(), q.detach()
    e_norm = e_det.norm(dim=-1, keepdim=True)
    q_norm = q_det.norm(dim=-1, keepdim=True)
    ok = (e_norm > NORM_EPS) & (q_norm > NORM_EPS)
    u = (e_det / e_norm.clamp_min(NORM_EPS)) * ok
    w = (q_det / q_norm.clamp_min(NORM_EPS)) * ok
    # u ≈ -w leaves r ≈ 0, and R = I + 2wuᵀ = I - 2uuᵀ still maps e onto the direction of q.
    r = u + w
    r = r / r.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    lam = (q_norm / e_norm.clamp_min(NORM_EPS)).where(ok, 1.0)
    e_dot_r = (e * r).sum(dim=-1, keepdim=True)
    e_dot_u = (e * u).sum(dim=-1, keepdim=True)
    rotated = lam * (e - 2.0 * e_dot_r * r + 2.0 * e_dot_u * w)
    return q_det + (rotated - rotated.detach())
