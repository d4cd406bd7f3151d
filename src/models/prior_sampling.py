"""Sampling code sequences from the prior: KV-cached decoding with a per-step logits hook.

The hook does two things at every step, in this order:

1. classifier-free guidance: the batch is run doubled, conditional rows (class prefix) over
   unconditional rows (null prefix); the hook returns ``lerp(uncond, cond, cfg_scale)``, one row
   per sample, and the drawn token continues both halves. ``torch.lerp`` is exact at its ends:
   scale 0 gives the unconditional logits and scale 1 the conditional logits bit for bit.
2. slot constraints: ids outside the layout's ``allowed_slices(step)`` are set to ``-inf`` (after
   guidance, so no ``-inf - -inf``), so every sampled sequence decodes into valid codes.

Tokens are then drawn by ``sample_next`` (temperature, top-k, top-p) of src/models/grok_generate.py,
one row per stream, all streams of a step at once (parallel heads).
"""

from __future__ import annotations

import torch
from torch import Tensor

from src.models.grok_generate import sample_next
from src.models.prior_net import CodeSequenceNet


def check_sampling(
    temperature: float, top_k: int | None, top_p: float | None, cfg_scale: float | None
) -> None:
    """A ValueError naming every bad sampling setting."""
    problems = []
    if temperature < 0:
        problems.append(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        problems.append(f"top_k must be >= 1 or null, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1] or null, got {top_p}")
    if cfg_scale is not None and cfg_scale < 0:
        problems.append(f"cfg_scale must be >= 0 or null (no guidance), got {cfg_scale}")
    if problems:
        raise ValueError("sampling: " + "; ".join(problems))


@torch.no_grad()
def sample_tokens(
    net: CodeSequenceNet,
    labels: Tensor | None,
    num_samples: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Full token sequences ``(B, L[, S])`` of the net's layout, prefix first.

    ``labels`` ``(B,)`` (``-1`` = null class) for a class-conditional layout, None for an
    unconditional one. ``cfg_scale`` (conditional layouts only; None = plain conditional
    sampling) guides every row towards its label.
    """
    check_sampling(temperature, top_k, top_p, cfg_scale)
    layout = net.layout
    device = net.lm.embed_tokens.weight.device
    prefix = layout.prefix_tokens(labels, num_samples, device=device)
    guided = cfg_scale is not None
    if guided:
        if not layout.num_classes:
            raise ValueError("cfg_scale needs a class-conditional prior (this one has no classes)")
        prefix = torch.cat([prefix, torch.full_like(prefix, layout.null_token)])
    rows = prefix.shape[0]
    streams = layout.num_streams
    shape = (rows, 1, streams) if layout.multi_stream else (rows, 1)  # one step of tokens
    tokens = prefix.view(rows, 1, 1).expand(rows, 1, streams).reshape(shape)
    cache = net.new_cache(rows, layout.seq_len - 1)
    logits = net.step(tokens, cache)[:, -1]
    for step in range(1, layout.seq_len):
        logits = logits.float()
        if guided:
            logits = torch.lerp(logits[num_samples:], logits[:num_samples], cfg_scale)
        logits = layout.constrain_logits(logits, step)
        flat = logits.reshape(-1, logits.shape[-1])
        token = sample_next(flat, temperature, top_k, top_p, generator)
        token = token.view(num_samples, streams).repeat(rows // num_samples, 1).view(shape)
        tokens = torch.cat([tokens, token], dim=1)
        if step + 1 < layout.seq_len:
            logits = net.step(token, cache)[:, -1]
    return tokens[:num_samples]
