"""Grok-1's mixture of experts: dropless top-k routing with tokens grouped by expert.

Router (float32 even under autocast): logits = x @ gate^T, soft cap 30 tanh(./30), softmax
over all experts, top-k, kept weights renormalised to sum to 1. Each expert is
`linear_1(gelu(linear(x)) * linear_v(x))` with the exact (erf) GELU.

Dispatch without a per-expert scan of every token: the (token, slot) assignments are sorted
by expert, the tokens gathered into one expert-contiguous matrix, each projection is one
grouped matmul over the expert segments (grok_grouped.py: `torch._grouped_mm` on GPUs and
under torch.compile; on CPU a loop running the whole expert FFN per contiguous segment,
which keeps each segment's activations in cache), and the weighted rows are added back to
their tokens with `index_add_`. No capacity limit: every token reaches its
k experts. The router gets gradients through the kept (renormalised) top-k weights and, in training,
through the load-balancing loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.models.grok_config import GrokConfig
from src.models.grok_grouped import expert_ffn
from src.models.grok_ops import soft_cap


class RouterStats(NamedTuple):
    """One MoE layer's training losses (unweighted) and usage statistics."""

    load_balance_loss: Tensor  # E * sum_e f_e P_e; 1.0 when perfectly balanced
    z_loss: Tensor  # mean over tokens of logsumexp(capped router logits)^2
    expert_load: Tensor  # (E,) fraction of the N*k assignments each expert got (detached)
    router_entropy: Tensor  # () mean entropy (nats) of the routing softmax (detached)


class Routing(NamedTuple):
    weights: Tensor  # (N, k) kept routing weights (renormalised if so configured)
    experts: Tensor  # (N, k) expert indices
    probs: Tensor  # (N, E) softmax over all experts
    logits: Tensor  # (N, E) capped router logits


class GrokMoE(nn.Module):
    """Router `gate` plus E experts stored stacked: `w_in[e]` is the checkpoint's `linear`
    (rows :ffn) over `linear_v` (rows ffn:), so gate and up projections are one matmul;
    `w_out[e]` is `linear_1`."""

    def __init__(self, cfg: GrokConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.ffn = cfg.intermediate_size
        self.cap = cfg.router_logit_softcapping
        self.backend = cfg.moe_backend
        self.renormalize = True  # Grok-1 (renormalize=True in the seed)
        e, h, f = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate = nn.Linear(h, e, bias=False)
        self.w_in = nn.Parameter(torch.empty(e, 2 * f, h))
        self.w_out = nn.Parameter(torch.empty(e, h, f))
        self.reset_parameters(cfg.initializer_range)

    def reset_parameters(self, std: float, out_std: float | None = None) -> None:
        """Router and expert inputs N(0, std); expert outputs N(0, out_std or std)."""
        nn.init.normal_(self.gate.weight, std=std)
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=std if out_std is None else out_std)

    def route(self, x: Tensor) -> Routing:
        """Router math for x (N, hidden), in float32 (or wider) with autocast off."""
        wide = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(wide), self.gate.weight.to(wide))
        logits = soft_cap(logits, self.cap)
        probs = F.softmax(logits, dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return Routing(weights, experts, probs, logits)

    def stats(self, routing: Routing, counts: Tensor) -> RouterStats:
        n = routing.probs.shape[0]
        load = counts.to(routing.probs.dtype) / (n * self.top_k)
        mean_prob = routing.probs.mean(0)
        return RouterStats(
            load_balance_loss=self.num_experts * (load * mean_prob).sum(),
            z_loss=torch.logsumexp(routing.logits, dim=-1).pow(2).mean(),
            expert_load=load.detach(),
            router_entropy=torch.special.entr(routing.probs).sum(-1).mean().detach(),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, RouterStats]:
        """x (..., hidden) -> (output of x's shape and dtype, this layer's RouterStats)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.route(x)
        flat = routing.experts.reshape(-1)  # (N*k,) expert of each (token, slot)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        order = torch.argsort(flat, stable=True)
        token = order // self.top_k  # source token of each expert-sorted row
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        xs = x[token].to(dtype)
        ys = expert_ffn(xs, self.w_in.to(dtype), self.w_out.to(dtype), counts, self.backend)
        weighted = ys.to(routing.weights.dtype) * routing.weights.reshape(-1)[order, None]
        out = torch.zeros(x.shape, dtype=weighted.dtype, device=x.device)
        out.index_add_(0, token, weighted)
        return out.to(x.dtype).reshape(shape), self.stats(routing, counts)
