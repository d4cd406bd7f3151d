"""The experts' FFN over expert-sorted rows: `linear_1(gelu(linear(x)) * linear_v(x))` of
segment e with expert e's weights, by one of two strategies.

- grouped: each projection is one `torch._grouped_mm` over all segments. It runs on CPU
  (float32/bf16/fp16) in torch 2.11, but its meta function demands bf16 (the CUDA kernel's
  rule), so torch.compile cannot trace it in float32. Wrapped here as three custom ops
  (forward, grad-input, grad-weight) with their own shape functions, torch.compile treats
  each as one opaque call and the training forward compiles without graph breaks. The choice
  on GPUs (a real grouped kernel) and under torch.compile.
- segments: a loop over the E contiguous segments running the whole expert FFN per segment.
  On CPU torch's grouped_mm is itself a loop of matmuls, and running gate, GELU, product and
  down projection per segment keeps each segment's (n_e, 2 x ffn) activations in cache
  between the matmuls instead of streaming one (N*k, 2 x ffn) tensor through memory four
  times: 0.62 vs 0.79 s per forward+backward of the issue-13 MoE layer on 2 CPU threads
  (docs/benchmarks.md). Also the fallback where the kernel does not run (float64, odd
  strides, older GPUs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def grouped_linear(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """Rows of x (M, in) sorted by expert, `counts[e]` rows for expert e, times weight[e]^T
    (weight: (E, out, in)) per segment -> (M, out), as one grouped matmul."""
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    return _grouped_linear(x.contiguous(), weight.contiguous(), offsets)


def gated_gelu(gate_up: Tensor) -> Tensor:
    """(.., 2 x ffn) gate over up -> gelu(gate) * up (exact erf GELU). `chunk`, not two
    slices: its backward is one cat, where slices would zero-fill two full-width gradients."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate) * up


def expert_segments(xs: Tensor, w_in: Tensor, w_out: Tensor, counts: Tensor) -> Tensor:
    """The expert FFN per contiguous segment. `split`/`unbind` rather than slicing, so the
    backward assembles each gradient once (one cat / stack) instead of zero-filling a
    full-size tensor per expert."""
    sizes = counts.tolist()
    outs = [
        gated_gelu(seg @ w_e_in.t()) @ w_e_out.t()
        for seg, w_e_in, w_e_out in zip(
            xs.split(sizes), w_in.unbind(0), w_out.unbind(0), strict=True
        )
    ]
    return torch.cat(outs)


def use_grouped(xs: Tensor, w_in: Tensor, w_out: Tensor, backend: str) -> bool:
    """Which strategy runs for backend auto | grouped_mm | loop (module docstring)."""
    runs = grouped_mm_runs(xs, w_in) and grouped_mm_runs(xs, w_out)
    if backend == "grouped_mm" and not runs:
        raise RuntimeError(
            f"moe_backend='grouped_mm' does not run for {xs.dtype} on {xs.device.type} with "
            f"shapes {tuple(xs.shape)} x {tuple(w_in.shape)}; use moe_backend='auto' or 'loop'"
        )
    if backend == "loop" or not runs:
        return False
    return backend == "grouped_mm" or xs.device.type != "cpu" or torch.compiler.is_compiling()


def expert_ffn(xs: Tensor, w_in: Tensor, w_out: Tensor, counts: Tensor, backend: str) -> Tensor:
    """Rows xs (M, hidden) sorted by expert (`counts[e]` rows for expert e), w_in (E, 2 x ffn,
    hidden) = gate over up, w_out (E, hidden, ffn) -> (M, hidden)."""
    if use_grouped(xs, w_in, w_out, backend):
        hidden = gated_gelu(grouped_linear(xs, w_in, counts))
        return grouped_linear(hidden, w_out, counts)
    return expert_segments(xs, w_in, w_out, counts)
