"""GrokConfig: the Grok-1 architecture's hyper-parameters (defaults: Grok-1's real sizes).

Field names are the ones vLLM's Grok-1 reads from the model config (../shared/spec/grok1.md),
plus a few training/runtime fields of our own, listed after them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class GrokConfig:
    """Grok-1 hyper-parameters; the defaults build the real 315.7B-parameter model."""

    vocab_size: int = 131072
    hidden_size: int = 6144
    intermediate_size: int = 32768  # width of each expert's FFN
    num_hidden_layers: int = 64
    num_attention_heads: int = 48
    num_key_value_heads: int = 8  # GQA: 6 query heads share each K/V head
    num_experts: int = 8
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    embedding_multiplier_scale: float = 78.38367176906169  # sqrt(6144)
    output_multiplier_scale: float = 0.5773502691896257  # 1/sqrt(3)
    attn_output_multiplier: float = 0.08838834764831845  # 128**-0.5 (head_dim**-0.5)
    attn_logit_softcapping: float = 30.0  # 30 * tanh(s / 30) on attention scores; 0 = off
    router_logit_softcapping: float = 30.0  # the same on router logits; 0 = off
    tie_word_embeddings: bool = True
    # ---- ours (not in the seed): training and runtime ----
    router_aux_loss_coef: float = 0.01  # weight of the Switch load-balancing loss
    router_z_loss_coef: float = 0.001  # weight of the ST-MoE router z-loss
    initializer_range: float = 0.02  # std of the normal init of the projections
    attn_query_chunk: int = 512  # queries per block once T exceeds it (bounds score memory)
    # "auto": grouped_mm on GPUs and under torch.compile, per-expert segments on CPU (faster
    # there, grok_grouped.py); or force "grouped_mm" / "loop" (the segments)
    moe_backend: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        elif (self.hidden_size // self.num_attention_heads) % 2:
            problems.append("head_dim must be even for rotary embeddings")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            problems.append(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in "
                f"[1, num_experts={self.num_experts}]"
            )
        if self.attn_query_chunk < 1:
            problems.append("attn_query_chunk must be >= 1")
        if self.moe_backend not in ("auto", "grouped_mm", "loop"):
            problems.append(f"moe_backend {self.moe_backend!r}: use auto, grouped_mm or loop")
        if problems:
            raise ValueError("GrokConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @staticmethod
    def multipliers_for(hidden_size: int, num_attention_heads: int) -> dict[str, float]:
        """Grok-1's multipliers re-derived for another size: sqrt(hidden), head_dim**-0.5,
        and the output multiplier 1/sqrt(3) (a constant in Grok-1)."""
        return {
            "embedding_multiplier_scale": math.sqrt(hidden_size),
            "attn_output_multiplier": (hidden_size // num_attention_heads) ** -0.5,
            "output_multiplier_scale": 3**-0.5,
        }
