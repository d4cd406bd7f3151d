"""One Grok-1 decoder layer: attention and MoE, each in a four-RMSNorm "sandwich".

    r = r + post_attn_norm(attn(pre_attn_norm(r)))
    r = r + post_moe_norm(moe(pre_moe_norm(r)))
(the seed's fused add+norm calls compute exactly these two lines).
"""

from __future__ import annotations

from torch import Tensor, nn

from src.models.grok_attention import GrokAttention
from src.models.grok_cache import GrokKVCache
from src.models.grok_config import GrokConfig
from src.models.grok_moe import GrokMoE, RouterStats
from src.models.grok_ops import RMSNorm


class GrokDecoderLayer(nn.Module):
    def __init__(self, cfg: GrokConfig) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.attn = GrokAttention(cfg)
        self.moe_block = GrokMoE(cfg)
        self.pre_attn_norm = RMSNorm(h, eps)
        self.post_attn_norm = RMSNorm(h, eps)
        self.pre_moe_norm = RMSNorm(h, eps)
        self.post_moe_norm = RMSNorm(h, eps)

    def forward(
        self,
        r: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: GrokKVCache | None = None,
        layer: int = 0,
    ) -> tuple[Tensor, RouterStats]:
        r = r + self.post_attn_norm(self.attn(self.pre_attn_norm(r), cos, sin, cache, layer))
        moe_out, stats = self.moe_block(self.pre_moe_norm(r))
        return r + self.post_moe_norm(moe_out), stats
