"""Grok-1 self-attention: GQA, NeoX RoPE, tanh-capped scores, output multiplier.

The soft cap sits between the scores and the softmax, so the fused SDPA kernels (which take
the scores straight to the softmax) do not apply. Scores are computed per block of queries
instead: a block of queries [a, b) only needs keys [0, b) (causal), so at most
`attn_query_chunk x T` scores per head exist at a time, never the full (T, T) matrix once T
exceeds the block size. Under autograd each block is recomputed in the backward pass
(activation checkpointing), so training does not keep every block's scores either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from src.models.grok_cache import GrokKVCache
from src.models.grok_config import GrokConfig
from src.models.grok_ops import apply_rope, soft_cap


def attention_block(
    q: Tensor, k: Tensor, v: Tensor, q_start: int, scale: float, cap: float
) -> Tensor:
    """Causal capped attention of one block of queries.

    q: (B, kv_heads, group, tq, hd) at absolute positions q_start .. q_start + tq - 1;
    k, v: (B, kv_heads, S, hd) at positions 0 .. S - 1. Returns (B, kv_heads, group, tq, hd).
    Scores, cap and softmax run in float32 (or wider); the matmuls in the inputs' dtype.
    """
    b, h_kv, group, tq, hd = q.shape
    s = k.shape[2]
    scores = torch.matmul(q.reshape(b, h_kv, group * tq, hd), k.transpose(-1, -2))
    wide = torch.promote_types(scores.dtype, torch.float32)
    scores = scores.view(b, h_kv, group, tq, s).to(wide)
    q_pos = torch.arange(q_start, q_start + tq, device=q.device)
    future = torch.arange(s, device=q.device)[None, :] > q_pos[:, None]
    if torch.is_grad_enabled():
        scores = soft_cap(scores * scale, cap).masked_fill(future, float("-inf"))
    else:  # inference: one scores buffer rewritten in place instead of five temporaries
        scores = scores.mul_(scale)
        if cap > 0:
            scores = scores.div_(cap).tanh_().mul_(cap)
        scores = scores.masked_fill_(future, float("-inf"))
    probs = F.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs.view(b, h_kv, group * tq, s), v)
    return out.view(b, h_kv, group, tq, hd)


def capped_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, q_offset: int, scale: float, cap: float, chunk: int
) -> Tensor:
    """Attention of queries q (B, kv_heads, group, T, hd) at positions q_offset + [0, T) over
    keys/values (B, kv_heads, q_offset + T, hd), in blocks of at most `chunk` queries."""
    t = q.shape[3]
    if t <= chunk:
        return attention_block(q, k, v, q_offset, scale, cap)
    recompute = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    outs = []
    for a in range(0, t, chunk):
        b = min(a + chunk, t)
        args = (q[:, :, :, a:b], k[:, :, : q_offset + b], v[:, :, : q_offset + b])
        if recompute:
            outs.append(
                checkpoint(attention_block, *args, q_offset + a, scale, cap, use_reentrant=False)
            )
        else:
            outs.append(attention_block(*args, q_offset + a, scale, cap))
    return torch.cat(outs, dim=3)


class GrokAttention(nn.Module):
    """Bias-free q/k/v/o projections; query head h reads K/V head h // (heads / kv_heads)."""

    def __init__(self, cfg: GrokConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.cap = cfg.attn_logit_softcapping
        self.output_multiplier = cfg.attn_output_multiplier
        self.chunk = cfg.attn_query_chunk
        hidden, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, hidden, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: GrokKVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """x (B, T, hidden) at positions described by cos/sin (T, head_dim); with a cache,
        those are positions cache.length + [0, T) and the past comes from the cache."""
        b, t, _ = x.shape
        h_kv, hd = self.num_kv_heads, self.head_dim
        group = self.num_heads // h_kv
        q = self.q_proj(x).view(b, t, h_kv, group, hd).permute(0, 2, 3, 1, 4)
        k = self.k_proj(x).view(b, t, h_kv, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, h_kv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        offset = 0
        if cache is not None:
            offset = cache.length
            k, v = cache.update(layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        out = capped_causal_attention(q, k, v, offset, self.scale, self.cap, self.chunk)
        out = out.permute(0, 3, 1, 2, 4).reshape(b, t, self.num_heads * hd)
        return self.o_proj(out) * self.output_multiplier
