"""Epoch metrics of the prior as torchmetrics Metrics (summed over ranks under DDP).

* ``CodeNLL``: summed negative log-likelihood (nats) and target-token count ->
  ``nll`` (nats per code token), ``bits_per_token``, ``perplexity`` and ``bits_per_sample``
  (the bits a whole image / clip costs: nats per sample / ln 2).
* ``ExpertUsage``: per layer and expert, the routed (token, slot) assignments; routing entropy,
  z-loss and load-balancing loss weighted by tokens. Everything but the load-balancing loss is
  a sum over tokens, so several ranks' shards give exactly the union batch's values; the
  load-balancing loss is a product of two batch means and is averaged over batches, as trained.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from src.models.grok import GrokOutput

LN2 = math.log(2.0)


class CodeNLL(Metric):
    """``update(nll_sum, count, samples)``; ``compute()`` -> dict of nll, bits_per_token,
    perplexity, bits_per_sample."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nats", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, count: int | Tensor, samples: int) -> None:
        self.nats += nll_sum.detach().double()
        self.tokens += int(count)
        self.samples += int(samples)

    def compute(self) -> dict[str, Tensor]:
        nll = self.nats / self.tokens.clamp(min=1)
        return {
            "nll": nll.float(),
            "bits_per_token": (nll / LN2).float(),
            "perplexity": nll.exp().float(),
            "bits_per_sample": (self.nats / self.samples.clamp(min=1) / LN2).float(),
        }


class ExpertUsage(Metric):
    """Routing statistics of a GrokLM over an epoch.

    ``compute()`` gives ``load`` ``(L, E)`` (fraction of each layer's assignments per expert),
    ``expert_utilization`` (mean over layers of ``exp(H(load_l)) / E``: 1.0 when every expert
    gets the same share, ``1/E`` when one gets all), ``router_entropy`` (mean over layers and
    tokens, nats), ``z_loss`` and ``load_balance_loss`` (layer means).
    """

    full_state_update = False

    def __init__(self, num_layers: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        shape = (num_layers, num_experts)
        self.add_state("counts", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        zeros = torch.zeros(num_layers, dtype=torch.float64)
        self.add_state("entropy", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("z_loss", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("balance", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("batches", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, out: GrokOutput, num_tokens: int) -> None:
        """``out`` of one forward over ``num_tokens`` input positions (all routed)."""
        n = float(num_tokens)
        # expert_load is counts / (n k): back to exact integer counts
        self.counts += (out.expert_load.double() * n * self.top_k).round()
        self.tokens += n
        self.entropy += out.router_entropy.detach().double() * n
        self.z_loss += out.z_loss.detach().double() * n
        self.balance += out.load_balance_loss.detach().double()
        self.batches += 1.0

    def compute(self) -> dict[str, Tensor]:
        load = self.counts / self.counts.sum(-1, keepdim=True).clamp(min=1)
        entropy = torch.special.entr(load).sum(-1)
        tokens = self.tokens.clamp(min=1)
        return {
            "load": load.float(),
            "expert_utilization": (entropy.exp() / load.shape[-1]).mean().float(),
            "router_entropy": (self.entropy / tokens).mean().float(),
            "z_loss": (self.z_loss / tokens).float(),
            "load_balance_loss": (self.balance / self.batches.clamp(min=1)).float(),
        }


def expert_log_values(stage: str, usage: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stable names: ``<stage>/moe/{load_balance_loss,z_loss,expert_utilization,router_entropy}``
    and ``<stage>/moe/<layer>/load/<expert>``."""
    values = {
        f"{stage}/moe/{name}": usage[name]
        for name in ("load_balance_loss", "z_loss", "expert_utilization", "router_entropy")
    }
    for layer, row in enumerate(usage["load"]):
        for expert, share in enumerate(row):
            values[f"{stage}/moe/{layer}/load/{expert}"] = share
    return values
