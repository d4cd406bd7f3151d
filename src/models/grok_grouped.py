"""Grouped matmul of expert-sorted rows: segment e of x times weight[e]^T, one kernel.

`torch._grouped_mm` runs on CPU (float32/bf16/fp16) in torch 2.11, but its meta function
demands bf16 (the CUDA kernel's rule), so torch.compile cannot trace it in float32. Wrapped
here as three custom ops (forward, grad-input, grad-weight) with their own shape functions,
torch.compile treats each as one opaque call and the training forward compiles without graph
breaks. Where the kernel does not run (float64, odd strides, older GPUs) a loop over the E
contiguous segments does the same job.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _aligned(t: Tensor) -> bool:
    return all(s * t.element_size() % 16 == 0 for s in t.shape[-1:])


def grouped_mm_runs(x: Tensor, weight: Tensor) -> bool:
    """Where torch._grouped_mm runs (torch 2.11): CPU in float32/bf16/fp16 (not float64),
    CUDA in bf16 on compute capability >= 9.0; rows a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or not (_aligned(x) and _aligned(weight)):
        return False
    if weight.shape[1] * weight.element_size() % 16:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


@torch.library.custom_op("vqzoo::grouped_linear", mutates_args=())
def _grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """x (M, in) with expert e's rows in [offsets[e-1], offsets[e]) -> (M, out)."""
    return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)


@_grouped_linear.register_fake
def _(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("vqzoo::grouped_linear_grad_input", mutates_args=())
def _grad_input(grad: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    return torch._grouped_mm(grad, weight, offs=offsets)


@_grad_input.register_fake
def _(grad: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    return grad.new_empty(grad.shape[0], weight.shape[2])


@torch.library.custom_op("vqzoo::grouped_linear_grad_weight", mutates_args=())
def _grad_weight(grad: Tensor, x: Tensor, offsets: Tensor) -> Tensor:
    """Per segment grad^T @ x -> (E, out, in); an empty segment gets zeros."""
    return torch._grouped_mm(grad.t(), x, offs=offsets)


@_grad_weight.register_fake
def _(grad: Tensor, x: Tensor, offsets: Tensor) -> Tensor:
    return grad.new_empty(offsets.shape[0], grad.shape[1], x.shape[1])


def _setup(ctx, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x, weight, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = _grad_input(grad, weight, offsets) if ctx.needs_input_grad[0] else None
    grad_w = _grad_weight(grad, x, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_grouped_linear.register_autograd(_backward, setup_context=_setup)


def grouped_linear(x: Tensor, weight: Tensor, counts: Tensor, backend: str) -> Tensor:
    """Rows of x (M, in) sorted by expert, `counts[e]` rows for expert e, times weight[e]^T
    (weight: (E, out, in)) per segment -> (M, out). backend: auto | grouped_mm | loop."""
    runs = grouped_mm_runs(x, weight)
    if backend == "grouped_mm" and not runs:
        raise RuntimeError(
            f"moe_backend='grouped_mm' does not run for {x.dtype} on {x.device.type} with "
            f"shapes {tuple(x.shape)} x {tuple(weight.shape)}; use moe_backend='auto' or 'loop'"
        )
    if runs and backend != "loop":
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        return _grouped_linear(x.contiguous(), weight.contiguous(), offsets)
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        outs.append(x[start : start + n] @ weight[e].t())
        start += n
    return torch.cat(outs)
