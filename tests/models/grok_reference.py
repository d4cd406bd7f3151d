"""An independent, deliberately plain reading of ../shared/spec/grok1.md (float64, loops over
heads and tokens), computed straight from a checkpoint dict in the Grok-1 naming.

Each `Ablation` flag switches one feature off, so a test can show that removing it moves the
output beyond tolerance (i.e. the equivalence test would catch its absence).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from src.models.grok import GrokConfig


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second OpenMP thread only adds contention on a shared box (10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Ablation:
    router_cap: bool = True
    attn_cap: bool = True
    embedding_multiplier: bool = True
    output_multiplier: bool = True
    neox_rope: bool = True  # False: interleaved (GPT-J) pairs (0,1), (2,3), ...
    post_norms: bool = True
    attn_output_multiplier: bool = True
    renormalize: bool = True


def tiny_config(**overrides) -> GrokConfig:
    """2 layers, hidden 32, 4 query / 2 K/V heads (head_dim 8), 4 experts top-2."""
    fields = dict(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        **GrokConfig.multipliers_for(32, 4),
    )
    fields.update(overrides)
    return GrokConfig(**fields)


def random_checkpoint(cfg: GrokConfig, seed: int = 0) -> dict[str, Tensor]:
    """Random float64 weights under the Grok-1 names: non-unit norm scales, attention and
    router weights large enough that both soft caps work in their non-linear range."""
    g = torch.Generator().manual_seed(seed)
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

    def randn(*shape: int, std: float) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    def scale() -> Tensor:
        return 1 + 0.5 * randn(h, std=1.0)

    w = {
        "model.embed_tokens.weight": randn(cfg.vocab_size, h, std=0.3),
        "model.norm.scale": scale(),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w[p + "attn.q_proj.weight"] = randn(cfg.num_attention_heads * hd, h, std=0.9)
        w[p + "attn.k_proj.weight"] = randn(cfg.num_key_value_heads * hd, h, std=0.9)
        w[p + "attn.v_proj.weight"] = randn(cfg.num_key_value_heads * hd, h, std=0.3)
        w[p + "attn.o_proj.weight"] = randn(h, cfg.num_attention_heads * hd, std=0.3)
        w[p + "moe_block.gate.weight"] = randn(cfg.num_experts, h, std=8.0)
        for e in range(cfg.num_experts):
            q = f"{p}moe_block.experts.{e}."
            w[q + "linear.weight"] = randn(f, h, std=0.3)
            w[q + "linear_v.weight"] = randn(f, h, std=0.3)
            w[q + "linear_1.weight"] = randn(h, f, std=0.3)
        for n in ("pre_attn", "post_attn", "pre_moe", "post_moe"):
            w[f"{p}{n}_norm.scale"] = scale()
    return w


def rms(x: Tensor, scale: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * scale


def cap(x: Tensor, c: float, on: bool) -> Tensor:
    return c * torch.tanh(x / c) if on else x


def rope(x: Tensor, theta: float, neox: bool) -> Tensor:
    """x (T, head_dim) at positions 0..T-1."""
    t, d = x.shape
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * freq[None]
    c, s = ang.cos(), ang.sin()
    if neox:
        a, b = x[:, : d // 2], x[:, d // 2 :]
        return torch.cat((a * c - b * s, b * c + a * s), -1)
    a, b = x[:, 0::2], x[:, 1::2]
    return torch.stack((a * c - b * s, b * c + a * s), -1).flatten(-2)


def attention(w: dict, p: str, cfg: GrokConfig, x: Tensor, ab: Ablation) -> Tensor:
    """One sequence x (T, hidden) -> attention block output (T, hidden), before post-norm."""
    t, hd = x.shape[0], cfg.head_dim
    q = (x @ w[p + "attn.q_proj.weight"].T).view(t, cfg.num_attention_heads, hd)
    k = (x @ w[p + "attn.k_proj.weight"].T).view(t, cfg.num_key_value_heads, hd)
    v = (x @ w[p + "attn.v_proj.weight"].T).view(t, cfg.num_key_value_heads, hd)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    heads = []
    for j in range(cfg.num_attention_heads):
        qj = rope(q[:, j], cfg.rope_theta, ab.neox_rope)
        kj = rope(k[:, j // group], cfg.rope_theta, ab.neox_rope)
        s = cap(qj @ kj.T / math.sqrt(hd), cfg.attn_logit_softcapping, ab.attn_cap)
        s = s.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
        heads.append(torch.softmax(s, -1) @ v[:, j // group])
    out = torch.cat(heads, -1) @ w[p + "attn.o_proj.weight"].T
    return out * (cfg.attn_output_multiplier if ab.attn_output_multiplier else 1.0)


def moe(w: dict, p: str, cfg: GrokConfig, x: Tensor, ab: Ablation) -> Tensor:
    """Tokens x (N, hidden) -> MoE block output, one token at a time."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        logits = cap(
            w[p + "moe_block.gate.weight"] @ x[n], cfg.router_logit_softcapping, ab.router_cap
        )
        probs = torch.softmax(logits, -1)
        top = torch.argsort(probs, descending=True)[: cfg.num_experts_per_tok]
        weights = probs[top] / (probs[top].sum() if ab.renormalize else 1.0)
        for e, we in zip(top.tolist(), weights, strict=True):
            q = f"{p}moe_block.experts.{e}."
            a = torch.nn.functional.gelu(w[q + "linear.weight"] @ x[n]) * (
                w[q + "linear_v.weight"] @ x[n]
            )
            out[n] += we * (w[q + "linear_1.weight"] @ a)
    return out


def logits(w: dict, cfg: GrokConfig, ids: Tensor, ab: Ablation = Ablation()) -> Tensor:
    """ids (B, T) -> (B, T, vocab) logits, float64."""
    eps, rows = cfg.rms_norm_eps, []
    emb = w["model.embed_tokens.weight"]
    for seq in ids:
        r = emb[seq] * (cfg.embedding_multiplier_scale if ab.embedding_multiplier else 1.0)
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            a = attention(w, p, cfg, rms(r, w[p + "pre_attn_norm.scale"], eps), ab)
            r = r + (rms(a, w[p + "post_attn_norm.scale"], eps) if ab.post_norms else a)
            m = moe(w, p, cfg, rms(r, w[p + "pre_moe_norm.scale"], eps), ab)
            r = r + (rms(m, w[p + "post_moe_norm.scale"], eps) if ab.post_norms else m)
        out = rms(r, w["model.norm.scale"], eps) @ w.get("lm_head.weight", emb).T
        rows.append(out * (cfg.output_multiplier_scale if ab.output_multiplier else 1.0))
    return torch.stack(rows)
