"""The prior's network: a GrokLM read through a sequence layout of codes (src/prior).

One stream (``flatten``): the layout's token ids are the GrokLM's ids, its tied head gives the
logits. Parallel streams (``delay``, ``factorized``; ``S`` tokens per step): the GrokLM is built
with ``S * V`` ids, stream ``s`` owning ids ``[s V, (s+1) V)``; a step's input is the sum of its
``S`` token embeddings (times the embedding multiplier, as GrokLM scales its own ids) and the
tied head over all ``S * V`` ids, viewed as ``(S, V)``, gives every stream its own output head.
So each stream has its own embedding and head rows and no other parameter is added.
"""

from __future__ import annotations

from torch import Tensor, nn

from src.models.grok import GrokConfig, GrokKVCache, GrokLM, GrokOutput
from src.prior import CodeLayout


class CodeSequenceNet(nn.Module):
    """`net(tokens)` -> (logits, GrokOutput); `net.step(tokens, cache)` for KV-cached sampling.

    Token inputs are ``(B, T)`` (one stream) or ``(B, T, S)``; logits ``(B, T, V)`` or
    ``(B, T, S, V)`` with ``V = layout.vocab_size``.
    """

    def __init__(self, config: GrokConfig, layout: CodeLayout) -> None:
        super().__init__()
        self.layout = layout
        self.num_streams = layout.num_streams
        self.vocab_size = layout.vocab_size
        needed = self.vocab_size * self.num_streams
        if config.vocab_size != needed:
            raise ValueError(
                f"the GrokConfig has vocab_size {config.vocab_size}; the {layout.name} layout "
                f"needs {needed} ({self.num_streams} stream(s) x {self.vocab_size} ids)"
            )
        if config.max_position_embeddings < layout.seq_len - 1:
            raise ValueError(
                f"the {layout.name} layout's sequences are {layout.seq_len} tokens long (the model "
                f"reads {layout.seq_len - 1}), more than max_position_embeddings="
                f"{config.max_position_embeddings}: raise model.net.max_position_embeddings"
            )
        self.lm = GrokLM(config)

    def forward(self, tokens: Tensor) -> tuple[Tensor, GrokOutput]:
        """Logits of the next token at every input position, and the router losses/statistics."""
        return self._run(tokens, None, return_aux=True)

    def step(self, tokens: Tensor, cache: GrokKVCache) -> Tensor:
        """Logits of the new positions of ``tokens`` (appended to ``cache``)."""
        return self._run(tokens, cache, return_aux=False)[0]

    def new_cache(self, batch_size: int, max_length: int) -> GrokKVCache:
        return self.lm.new_cache(batch_size, max_length)

    def _run(
        self, tokens: Tensor, cache: GrokKVCache | None, return_aux: bool
    ) -> tuple[Tensor, GrokOutput | None]:
        if self.num_streams == 1 and not self.layout.multi_stream:
            if cache is not None:
                return self.lm.forward_with_cache(tokens, cache), None
            out = self.lm.forward_train(tokens)
            return out.logits, out
        if tokens.dim() != 3 or tokens.shape[-1] != self.num_streams:
            raise ValueError(
                f"{self.layout.name} tokens must be (batch, length, {self.num_streams} streams), "
                f"got {tuple(tokens.shape)}"
            )
        offsets = self.vocab_size * tokens.new_tensor(range(self.num_streams))
        embeds = self.lm.embed_tokens(tokens + offsets).sum(-2)
        embeds = embeds * self.lm.config.embedding_multiplier_scale
        if return_aux:
            out = self.lm.forward_embeds(embeds, cache, return_aux=True)
            hidden = out.logits  # forward_embeds puts the hidden states in the first field
        else:
            out, hidden = None, self.lm.forward_embeds(embeds, cache)
        logits = self.lm.logits(hidden)
        logits = logits.view(*logits.shape[:-1], self.num_streams, self.vocab_size)
        return logits, (out._replace(logits=logits) if out is not None else None)
