"""GrokLM: the Grok-1 mixture-of-experts transformer in plain PyTorch (trainable, no vLLM).

    h = embed_tokens[ids] * embedding_multiplier_scale
    r = decoder layers (grok_layer.py) over h
    logits = (norm(r) @ E^T) * output_multiplier_scale      (E = embedding when tied)

Semantics and checkpoint naming: ../shared/spec/grok1.md. Pieces: grok_config.py (fields),
grok_ops.py (RMSNorm, soft cap, RoPE), grok_attention.py, grok_moe.py, grok_layer.py,
grok_cache.py (KV cache), grok_generate.py (sampling), grok_weights.py (checkpoint names).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.models.grok_cache import GrokKVCache
from src.models.grok_config import GrokConfig
from src.models.grok_generate import LogitsHook, generate
from src.models.grok_layer import GrokDecoderLayer
from src.models.grok_moe import RouterStats
from src.models.grok_ops import RMSNorm, rope_cos_sin
from src.models.grok_weights import checkpoint_weights, load_checkpoint

__all__ = ["GrokConfig", "GrokKVCache", "GrokLM", "GrokOutput"]


class GrokOutput(NamedTuple):
    """Training forward: logits and the MoE losses / statistics (layer means, unweighted,
    except `aux_loss`, which is what to add to the language-model loss)."""

    logits: Tensor  # (B, T, vocab_size), output multiplier applied
    aux_loss: Tensor  # router_aux_loss_coef * load_balance_loss + router_z_loss_coef * z_loss
    load_balance_loss: Tensor  # mean over layers of E * sum_e f_e P_e (1.0 when balanced)
    z_loss: Tensor  # mean over layers of mean(logsumexp(router logits)^2)
    expert_load: Tensor  # (layers, experts) fraction of assignments per expert, detached
    router_entropy: Tensor  # (layers,) mean routing entropy in nats, detached


class GrokLM(nn.Module):
    """Grok-1 language model: `lm(ids)` -> logits; `forward_train`, `generate`,
    `load_weights` for training, sampling and Grok-1 checkpoints."""

    def __init__(self, config: GrokConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            GrokDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embedding std 1/embedding_multiplier_scale (so the scaled embedding has unit
        entries, and tied logits start near unit scale); projections N(0, initializer_range),
        the two that write into the residual stream (o_proj, linear_1) shrunk by
        1/sqrt(2 * layers); norm scales 1."""
        cfg = self.config
        std = cfg.initializer_range
        embed_std = 1 / cfg.embedding_multiplier_scale if cfg.embedding_multiplier_scale else std
        out_std = std / math.sqrt(2 * cfg.num_hidden_layers)
        nn.init.normal_(self.embed_tokens.weight, std=embed_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=embed_std)
        for layer in self.layers:
            for proj in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj):
                nn.init.normal_(proj.weight, std=std)
            nn.init.normal_(layer.attn.o_proj.weight, std=out_std)
            layer.moe_block.reset_parameters(std, out_std)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # ---- forward passes ----
    def _check_length(self, length: int, cache: GrokKVCache | None) -> tuple[int, int]:
        offset = 0 if cache is None else cache.length
        end = offset + length
        if end > self.config.max_position_embeddings:
            raise ValueError(
                f"GrokLM: position {end} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        return offset, end

    def _hidden(self, embeds: Tensor, cache: GrokKVCache | None) -> tuple[Tensor, list]:
        """Scaled input embeddings (B, T, hidden) -> final-normed hidden states, router stats."""
        offset, end = self._check_length(embeds.shape[1], cache)
        positions = torch.arange(offset, end, device=embeds.device)
        cos, sin = rope_cos_sin(
            positions, self.config.head_dim, self.config.rope_theta, embeds.dtype
        )
        r, stats = embeds, []
        for i, layer in enumerate(self.layers):
            r, layer_stats = layer(r, cos, sin, cache, i)
            stats.append(layer_stats)
        if cache is not None:
            cache.advance(embeds.shape[1])
        return self.norm(r), stats

    def logits(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden states -> logits: (tied) head, times output_multiplier_scale."""
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, head) * self.config.output_multiplier_scale

    def _run(self, input_ids: Tensor, cache: GrokKVCache | None) -> tuple[Tensor, list]:
        if input_ids.dim() != 2:
            raise ValueError(
                f"GrokLM: input_ids must be (batch, length), got {tuple(input_ids.shape)}"
            )
        embeds = self.embed_tokens(input_ids) * self.config.embedding_multiplier_scale
        hidden, stats = self._hidden(embeds, cache)
        return self.logits(hidden), stats

    def forward_embeds(
        self, embeds: Tensor, cache: GrokKVCache | None = None, return_aux: bool = False
    ) -> Tensor | GrokOutput:
        """The layers and final norm on given input embeddings (B, T, hidden), already scaled
        by embedding_multiplier_scale (e.g. sums of several streams' embeddings). Returns the
        final-normed hidden states (B, T, hidden), to be read out with `logits(...)` or any
        head; with return_aux, a GrokOutput whose `logits` field holds those hidden states.
        With a cache, as forward_with_cache."""
        if embeds.dim() != 3 or embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"GrokLM.forward_embeds: embeds must be (batch, length, "
                f"{self.config.hidden_size}), got {tuple(embeds.shape)}"
            )
        hidden, stats = self._hidden(embeds, cache)
        return self._with_aux(hidden, stats) if return_aux else hidden

    def forward(self, input_ids: Tensor, return_aux: bool = False) -> Tensor | GrokOutput:
        """input_ids (B, T) -> logits (B, T, vocab); with return_aux, a GrokOutput."""
        logits, stats = self._run(input_ids, None)
        return self._with_aux(logits, stats) if return_aux else logits

    def forward_train(self, input_ids: Tensor) -> GrokOutput:
        """Logits plus the router losses and statistics (through __call__, so a compiled
        module or hooks apply)."""
        return self(input_ids, return_aux=True)

    def _with_aux(self, logits: Tensor, stats: list[RouterStats]) -> GrokOutput:
        lb = torch.stack([s.load_balance_loss for s in stats]).mean()
        z = torch.stack([s.z_loss for s in stats]).mean()
        cfg = self.config
        return GrokOutput(
            logits=logits,
            aux_loss=cfg.router_aux_loss_coef * lb + cfg.router_z_loss_coef * z,
            load_balance_loss=lb,
            z_loss=z,
            expert_load=torch.stack([s.expert_load for s in stats]),
            router_entropy=torch.stack([s.router_entropy for s in stats]),
        )

    def forward_with_cache(self, input_ids: Tensor, cache: GrokKVCache) -> Tensor:
        """Logits (B, T, vocab) of T new tokens at positions cache.length + [0, T), reading
        the past from `cache` and appending the new keys/values to it."""
        return self._run(input_ids, cache)[0]

    # ---- decoding ----
    def new_cache(
        self,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> GrokKVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_length` positions
        (dtype/device default to the parameters')."""
        weight = self.embed_tokens.weight
        cfg = self.config
        return GrokKVCache(
            cfg.num_hidden_layers,
            batch_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
            max_length,
            dtype=dtype or weight.dtype,
            device=device or weight.device,
        )

    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        logits_hook: LogitsHook | None = None,
        use_cache: bool = True,
        cache_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Sample continuations (see grok_generate.generate): (B, T0) -> (B, T0 + new)."""
        return generate(
            self, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator,
            logits_hook, use_cache, cache_dtype,
        )  # fmt: skip

    # ---- Grok-1 checkpoints ----
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Load (name, tensor) pairs in the Grok-1 checkpoint naming; returns the names loaded,
        raises ValueError listing unknown / missing names and shape mismatches."""
        return load_checkpoint(self, weights)

    def checkpoint_weights(self) -> Iterator[tuple[str, Tensor]]:
        """This model's weights under the Grok-1 checkpoint names (tied lm_head omitted)."""
        return checkpoint_weights(self)
