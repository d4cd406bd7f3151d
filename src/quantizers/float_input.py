"""Input dtype rules shared by the quantizers: latents are floating point; a projection runs in
its own weights' dtype outside autocast (fp16 / bf16 latents into float32 weights would fail
with torch's "mat1 and mat2 must have the same dtype"), and the output keeps the input's dtype."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def check_float_input(x: Tensor, quantizer: str) -> None:
    """Raise a TypeError naming the fix when `x` is not a floating-point tensor."""
    if not torch.is_floating_point(x):
        raise TypeError(
            f"{quantizer} quantizes floating-point latents, got {x.dtype} input; cast it first "
            "(e.g. x.float()): integer tensors hold codes, not latents"
        )


def project(layer: nn.Module, x: Tensor) -> Tensor:
    """`layer(x)` for a projection (Linear, convolution or Identity): outside autocast, `x` is
    cast to the layer's weight dtype first (under autocast, autocast picks the dtype itself)."""
    if (
        isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd))
        and x.dtype != layer.weight.dtype
        and not torch.is_autocast_enabled(x.device.type)
    ):
        x = x.to(layer.weight.dtype)
    return layer(x)


def like_input(out: Tensor, x: Tensor) -> Tensor:
    """`out` in `x`'s dtype outside autocast (a projection in float32 of fp16 / bf16 latents
    gives them back in their own dtype); under autocast, autocast's dtype is kept."""
    if out.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        return out.to(x.dtype)
    return out
