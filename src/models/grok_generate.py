"""Autoregressive sampling from a GrokLM: KV-cached (or full-recompute) decoding.

`generate` feeds the prompt once, then one token per step through a preallocated
`GrokKVCache`; `use_cache=False` recomputes the whole prefix each step (the reference the
cache is tested against). A per-step `logits_hook(step, logits) -> logits` sees the float32
next-token logits of every row before temperature / top-k / top-p, and may rewrite them
(constrained slots: set disallowed tokens to -inf) or return fewer rows: with B rows in and
B' rows out (B' dividing B) one token is drawn per returned row and row r of the batch gets
token r % B'. Classifier-free guidance runs the model on [cond; uncond] (2B rows) and returns
the B guided rows, so both halves continue with the same token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from src.models.grok import GrokLM

LogitsHook = Callable[[int, Tensor], Tensor]


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row of logits (B, V): argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top_k tokens and to the smallest set of
    most likely tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(
    lm: GrokLM,
    prompt_ids: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    problems = []
    if prompt_ids.dim() != 2 or prompt_ids.dtype != torch.long or prompt_ids.shape[1] < 1:
        problems.append(
            f"prompt_ids must be a (batch, length >= 1) long tensor of equal-length prompts, "
            f"got {tuple(prompt_ids.shape)} {prompt_ids.dtype}"
        )
    if max_new_tokens < 0:
        problems.append(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        problems.append(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        problems.append(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1] or None, got {top_p}")
    total = prompt_ids.shape[-1] + max_new_tokens
    if total > lm.config.max_position_embeddings:
        problems.append(
            f"prompt + max_new_tokens = {total} exceeds max_position_embeddings "
            f"{lm.config.max_position_embeddings}"
        )
    if problems:
        raise ValueError("generate: " + "; ".join(problems))


@torch.no_grad()
def generate(
    lm: GrokLM,
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
    """Continue equal-length prompts (B, T0) by max_new_tokens tokens -> (B, T0 + new)."""
    _check(lm, prompt_ids, max_new_tokens, temperature, top_k, top_p)
    batch = prompt_ids.shape[0]
    ids = prompt_ids
    if max_new_tokens == 0:
        return ids
    cache = None
    if use_cache:
        cache = lm.new_cache(batch, ids.shape[1] + max_new_tokens, dtype=cache_dtype)
        logits = lm.forward_with_cache(ids, cache)[:, -1]
    else:
        logits = lm(ids)[:, -1]
    for step in range(max_new_tokens):
        logits = logits.float()
        if logits_hook is not None:
            logits = logits_hook(step, logits)
            rows = logits.shape[0]
            if logits.dim() != 2 or batch % rows:
                raise ValueError(
                    f"generate: logits_hook returned shape {tuple(logits.shape)}; it must "
                    f"return (rows, vocab) with rows dividing the batch of {batch}"
                )
        token = sample_next(logits, temperature, top_k, top_p, generator)
        token = token.repeat(batch // token.shape[0])
        ids = torch.cat((ids, token[:, None]), dim=1)
        if step + 1 == max_new_tokens:
            break
        if cache is not None:
            logits = lm.forward_with_cache(token[:, None], cache)[:, -1]
        else:
            logits = lm(ids)[:, -1]
    return ids
