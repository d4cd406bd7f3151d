"""Blocked attention, the KV cache, generate and torch.compile of the training forward."""

from __future__ import annotations

import pytest
import torch

from src.models.grok import GrokLM
from src.models.grok_generate import sample_next
from tests.models.grok_reference import one_thread, tiny_config

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def model(seed: int = 0, **overrides) -> GrokLM:
    """Tiny model; an untied random head keeps greedy decoding from repeating one token."""
    torch.manual_seed(seed)
    lm = GrokLM(tiny_config(**{"tie_word_embeddings": False, **overrides}))
    with torch.no_grad():  # livelier than the init: spread-out logits, busy soft caps
        for layer in lm.layers:
            layer.attn.q_proj.weight.mul_(20)
            layer.attn.k_proj.weight.mul_(20)
            layer.moe_block.gate.weight.mul_(50)
    return lm


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_blocked_attention_equals_one_block_in_values_and_gradients() -> None:
    """Queries in blocks of 16 (recomputed in backward) == all 100 queries at once."""
    whole, blocked = model(attn_query_chunk=10**6), model(attn_query_chunk=16)
    x = ids(2, 100)
    outs = []
    for lm in (whole, blocked):
        out = lm.forward_train(x)
        (out.logits.square().mean() + out.aux_loss).backward()
        outs.append((out.logits, [p.grad for p in lm.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[1][1], outs[0][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_blocked_attention_never_holds_the_full_score_matrix(monkeypatch) -> None:
    """At T=64 with blocks of 16, no score tensor has more than 16 query rows."""
    import src.models.grok_attention as attention

    shapes = []
    block = attention.attention_block

    def spy(q, k, v, *args):
        shapes.append((q.shape[3], k.shape[2]))
        return block(q, k, v, *args)

    monkeypatch.setattr(attention, "attention_block", spy)
    with torch.no_grad():
        model(attn_query_chunk=16)(ids(1, 64))
    assert shapes[:4] == [(16, 16), (16, 32), (16, 48), (16, 64)]  # layer 0; keys stop causally


def test_cache_holds_only_the_kv_heads_and_its_bytes_per_token() -> None:
    lm = model()
    cache = lm.new_cache(batch_size=3, max_length=40)
    cfg = lm.config
    assert cache.k.shape == (2, 3, cfg.num_key_value_heads, 40, cfg.head_dim)
    assert cache.bytes_per_token() == 2 * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert cache.nbytes() == 3 * 40 * cache.bytes_per_token()


def test_cached_forward_in_pieces_equals_the_full_forward() -> None:
    """Prefill 30 tokens (blocked: chunk 8), then 1, 1 and 7 at a time: same logits."""
    lm = model(attn_query_chunk=8)
    x = ids(2, 39)
    with torch.no_grad():
        full = lm(x)
        cache = lm.new_cache(2, 39)
        pieces = [
            lm.forward_with_cache(x[:, a:b], cache)
            for a, b in ((0, 30), (30, 31), (31, 32), (32, 39))
        ]
    assert cache.length == 39
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_greedy_with_cache_equals_greedy_by_full_recomputation() -> None:
    lm = model()
    prompt = ids(3, 5)
    cached = lm.generate(prompt, 64, temperature=0)
    recomputed = lm.generate(prompt, 64, temperature=0, use_cache=False)
    assert cached.shape == (3, 69) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[0, 5:].tolist())) > 3  # not a constant sequence


def test_sampling_is_seeded_and_top_k_1_is_greedy() -> None:
    lm = model()
    prompt = ids(4, 3)

    def draw(seed: int, **kw) -> torch.Tensor:
        return lm.generate(prompt, 20, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    greedy = lm.generate(prompt, 20, temperature=0)
    assert torch.equal(draw(3, top_k=1), greedy)
    assert torch.equal(draw(3, top_p=1e-6), greedy)


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    top2 = sample_next(logits, top_k=2, generator=g)
    assert set(top2.tolist()) == {0, 1}
    nucleus = sample_next(logits, top_p=0.85, generator=g)  # 0.4 + 0.3 + 0.2 reaches 0.85
    assert set(nucleus.tolist()) == {0, 1, 2}
    share = (nucleus == 0).float().mean().item()
    assert share == pytest.approx(0.4 / 0.9, abs=0.03)


def test_logits_hook_sees_every_row_and_steers_the_tokens() -> None:
    """The hook gets (step, float32 logits of all rows); a hook allowing one token per step
    (a constrained slot) decides every sampled token."""
    lm = model()
    seen = []

    def hook(step: int, logits: torch.Tensor) -> torch.Tensor:
        seen.append((step, tuple(logits.shape), logits.dtype))
        allowed = torch.full_like(logits, float("-inf"))
        allowed[:, (3 * step) % 50] = 0
        return logits + allowed

    out = lm.generate(ids(5, 4), 6, logits_hook=hook, generator=torch.Generator().manual_seed(0))
    assert seen == [(s, (5, 50), torch.float32) for s in range(6)]
    assert out[:, 4:].tolist() == [[0, 3, 6, 9, 12, 15]] * 5


def test_hook_returning_half_the_rows_gives_both_halves_the_same_tokens() -> None:
    """Classifier-free guidance: run [cond; uncond], return the B guided rows."""
    lm = model()
    prompt = ids(3, 4)
    doubled = torch.cat((prompt, prompt.flip(0)))

    def cfg_hook(step: int, logits: torch.Tensor) -> torch.Tensor:
        cond, uncond = logits.chunk(2)
        return uncond + 3.0 * (cond - uncond)

    out = lm.generate(doubled, 10, logits_hook=cfg_hook, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[:3, 4:], out[3:, 4:])
    with pytest.raises(ValueError, match="rows dividing the batch of 6"):
        lm.generate(doubled, 2, logits_hook=lambda step, logits: logits[:4])


def test_generate_rejects_bad_arguments() -> None:
    lm = model()
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 256"):
        lm.generate(ids(1, 200), 100)
    with pytest.raises(ValueError, match="top_p must be in"):
        lm.generate(ids(1, 2), 1, top_p=0)


@pytest.mark.slow  # inductor builds C++ kernels: ~1 min idle, 6 min on a loaded 2-core box
def test_compiled_training_forward_equals_eager() -> None:
    """torch.compile (inductor, no graph break: the grouped matmuls are custom ops) gives
    the eager logits and aux loss, and its backward reaches the experts."""
    lm = model()
    compiled = torch.compile(lm)
    x = ids(2, 24)
    eager = lm.forward_train(x)
    fast = compiled(x, return_aux=True)
    torch.testing.assert_close(fast.logits, eager.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.aux_loss, eager.aux_loss, rtol=1e-4, atol=1e-6)
    fast.logits.sum().backward()
    assert lm.layers[0].moe_block.w_in.grad.abs().sum() > 0


def test_forward_embeds_then_logits_equals_the_id_forward() -> None:
    """forward_embeds (for inputs built from embeddings, e.g. summed streams) + logits is
    the id forward, also through the cache; aux statistics come along."""
    lm = model()
    x = ids(2, 9)
    embeds = lm.embed_tokens(x) * lm.config.embedding_multiplier_scale
    with torch.no_grad():
        out = lm.forward_embeds(embeds, return_aux=True)
        reference = lm.forward_train(x)
        assert torch.equal(lm.logits(out.logits), reference.logits)
        assert torch.equal(out.expert_load, reference.expert_load)
        cache = lm.new_cache(2, 9)
        steps = [lm.logits(lm.forward_embeds(embeds[:, a:b], cache)) for a, b in ((0, 4), (4, 9))]
        torch.testing.assert_close(torch.cat(steps, 1), reference.logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="embeds must be"):
        lm.forward_embeds(embeds[..., :-1])
