"""Beam search over the depths of a residual VQ (the reference's `beam_size`).

Greedy residual quantization picks each depth's nearest code; a beam keeps the `beam`
best partial code sequences instead. At each depth every kept sequence is extended by the
`beam` nearest codes of its residual (VectorQuantize's top-k call), each extension is scored
by minus the sum of its depths' per-token commitment losses (optionally weighted per depth),
and the `beam` best survive; the last kept depth keeps one. Each token is searched on its
own. Codebook updates are applied afterwards by the caller, from the inputs each depth saw
on the chosen path (recomputed from its codes: `path_inputs`), so the EMA learns what greedy
quantization would have taught it along that path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from src.quantizers.residual import ResidualStack, frac_gradient


class BeamResult(NamedTuple):
    """total (M, d) sum of the chosen codes (with the estimators' gradients); indices and
    losses (M, kept) per depth."""

    total: Tensor
    indices: Tensor
    losses: Tensor


def path_inputs(x: Tensor, codes: Tensor) -> Tensor:
    """(kept, M, d) the residual each depth quantized on a path: x minus the codes (kept, M, d)
    of the depths before it."""
    before = torch.cumsum(codes, dim=0) - codes
    return x.unsqueeze(0) - before


def _pick(t: Tensor, chosen: Tensor) -> Tensor:
    """Rows `chosen` (M, b) of the beam axis 1 of `t` (M, j, ...)."""
    index = chosen.view(*chosen.shape, *([1] * (t.ndim - 2))).expand(-1, -1, *t.shape[2:])
    return t.gather(1, index)


def beam_search(
    stack: ResidualStack,
    x: Tensor,
    beam: int,
    num_kept: int,
    weights: Sequence[float],
    valid: Tensor | None = None,
    quant_grad_frac: float = 0.0,
    **layer_kwargs: object,
) -> BeamResult:
    """Search the first `num_kept` depths of `stack` for rows `x` (M, d) (float32).

    `valid` (M,) marks the rows that count (others get index -1 and zero loss);
    `layer_kwargs` (e.g. `sample_codebook_temp`, `freeze_codebook`) go to every layer call.
    """
    m, d = x.shape
    residual = x.unsqueeze(1)  # (M, j, d): j live beams per row
    total = torch.zeros_like(residual)
    scores = x.new_zeros(m, 1)
    indices = torch.zeros(m, 1, 0, dtype=torch.long, device=x.device)
    losses = x.new_zeros(m, 1, 0)
    for depth in range(num_kept):
        j = residual.shape[1]
        mask = None if valid is None else valid.repeat_interleave(j).view(1, m * j)
        layer = stack.layer(depth)
        out = layer(residual.reshape(1, m * j, d), mask=mask, topk=beam, **layer_kwargs)
        k = out[1].shape[-1]
        codes = out[0].float().view(m, j, k, d)
        found = out[1].view(m, j, k)
        loss = out[2].float().view(m, j, k)
        scores = (scores.unsqueeze(-1) - float(weights[depth]) * loss.detach()).view(m, j * k)
        step = frac_gradient(codes, quant_grad_frac)
        residual = (residual.unsqueeze(2) - step).view(m, j * k, d)
        total = (total.unsqueeze(2) + codes).view(m, j * k, d)
        indices = torch.cat(
            [indices.unsqueeze(2).expand(-1, -1, k, -1), found.unsqueeze(-1)], dim=-1
        ).view(m, j * k, -1)
        losses = torch.cat(
            [losses.unsqueeze(2).expand(-1, -1, k, -1), loss.unsqueeze(-1)], dim=-1
        ).view(m, j * k, -1)
        keep = beam if depth < num_kept - 1 else 1
        if j * k > keep:
            scores, chosen = scores.topk(keep, dim=-1)
            residual, total = _pick(residual, chosen), _pick(total, chosen)
            indices, losses = _pick(indices, chosen), _pick(losses, chosen)
    return BeamResult(total[:, 0], indices[:, 0], losses[:, 0])
