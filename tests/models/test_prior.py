"""The prior (src/models/prior*.py) without a tokenizer: GrokLM on input embeddings, the
parallel-stream net against a brute-force reading, the loss and NLL metrics against per-token
sums, overfitting a fixed batch, reproducible sampling, classifier-free guidance at scales 0
and 1, expert statistics over shards, and the errors for bad codes and labels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src.models.grok import GrokConfig, GrokLM
from src.models.prior import CodePrior
from src.models.prior_metrics import ExpertUsage
from src.models.prior_sampling import sample_tokens

NET = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 128,
    "embedding_multiplier_scale": 32**0.5,
    "attn_output_multiplier": 8**-0.5,
}
# layout, codebook sizes, max_factor_bits
LAYOUTS = [("flatten", [12, 5], None), ("delay", [12, 5], None), ("factorized", [2**6], 3)]
GRID = (2, 3)


def make_prior(layout: str = "flatten", sizes=(12, 5), bits=None, classes: int = 10, **kw):
    torch.manual_seed(0)
    return CodePrior(
        NET,
        codebook_sizes=list(sizes),
        grid=list(GRID),
        num_classes=classes,
        layout=layout,
        max_factor_bits=bits,
        **kw,
    )


def random_codes(sizes, batch: int = 6, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, s, (batch, *GRID), generator=gen) for s in sizes], -1)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared box
    yield
    torch.set_num_threads(threads)


def test_forward_embeds_equals_the_id_forward_with_and_without_cache() -> None:
    torch.manual_seed(0)
    lm = GrokLM(GrokConfig(vocab_size=50, **NET)).eval()
    ids = torch.randint(0, 50, (3, 9))
    embeds = lm.embed_tokens(ids) * lm.config.embedding_multiplier_scale
    out = lm.forward_embeds(embeds, return_aux=True)
    reference = lm.forward_train(ids)
    assert torch.equal(lm.logits(out.logits), reference.logits)
    assert torch.equal(out.expert_load, reference.expert_load)
    assert torch.equal(lm.logits(lm.forward_embeds(embeds)), lm(ids))
    cache = lm.new_cache(3, 9)
    first = lm.logits(lm.forward_embeds(embeds[:, :5], cache))
    second = lm.logits(lm.forward_embeds(embeds[:, 5:], cache))
    torch.testing.assert_close(torch.cat([first, second], 1), lm(ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="embeds must be"):
        lm.forward_embeds(embeds[..., :-1])


def test_stream_net_sums_embeddings_and_gives_each_stream_its_head_rows() -> None:
    prior = make_prior("delay").eval()
    lm, layout = prior.net.lm, prior.layout
    tokens = layout.encode(random_codes([12, 5]), torch.arange(6))
    logits, _ = prior.net(tokens[:, :-1])
    v = layout.vocab_size
    # brute force: stream s reads embedding row s*V + id and is read out by head rows s*V..
    embeds = sum(
        lm.embed_tokens.weight[s * v + tokens[:, :-1, s]] for s in range(layout.num_streams)
    )
    hidden = lm.forward_embeds(embeds * lm.config.embedding_multiplier_scale)
    for s in range(layout.num_streams):
        head = lm.embed_tokens.weight[s * v : (s + 1) * v]
        expected = hidden @ head.T * lm.config.output_multiplier_scale
        torch.testing.assert_close(logits[:, :, s], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("layout", "sizes", "bits"), LAYOUTS)
def test_nll_is_the_mean_cross_entropy_over_allowed_ids(layout, sizes, bits) -> None:
    prior = make_prior(layout, sizes, bits).eval()
    codes, labels = random_codes(sizes), torch.tensor([0, 1, 2, -1, 4, 9])
    with torch.no_grad():
        prior.shared_step((codes, labels), "val")
        tokens = prior.layout.encode(codes, labels)
        logits, _ = prior.net(tokens[:, :-1])
    # brute force: per target, softmax over the ids its step allows only, skip padding
    total, count = 0.0, 0
    targets = tokens[:, 1:]
    mask = prior.layout.target_mask()
    for b in range(tokens.shape[0]):
        for t in range(targets.shape[1]):
            allowed = prior.layout.allowed_slices(t + 1)
            for s, ids in enumerate(allowed):
                if not (mask[t, s] if prior.layout.multi_stream else mask[t]):
                    continue
                row = logits[b, t, s] if prior.layout.multi_stream else logits[b, t]
                target = int(targets[b, t, s] if prior.layout.multi_stream else targets[b, t])
                total -= float(F.log_softmax(row[ids].double(), -1)[target - ids.start])
                count += 1
    assert count == 6 * math.prod(GRID) * len(prior.layout.slot_sizes)
    values = prior.metrics_for("val")["nll"].compute()
    nll = total / count
    assert float(values["nll"]) == pytest.approx(nll, rel=1e-5)
    assert float(values["bits_per_token"]) == pytest.approx(nll / math.log(2), rel=1e-5)
    assert float(values["perplexity"]) == pytest.approx(math.exp(nll), rel=1e-5)
    assert float(values["bits_per_sample"]) == pytest.approx(total / 6 / math.log(2), rel=1e-5)


@pytest.mark.parametrize(("layout", "sizes", "bits"), LAYOUTS)
def test_loss_on_a_fixed_batch_falls(layout, sizes, bits) -> None:
    prior = make_prior(layout, sizes, bits, class_dropout=0.0)
    batch = (random_codes(sizes, batch=4), torch.tensor([1, 2, 3, 4]))
    optimizer = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = prior.shared_step(batch, "train")
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["nll"]))
    # from about the log of the slot sizes (uniform) to a small fraction of it
    assert losses[0] > 1.0
    assert losses[-1] < 0.35 * losses[0], losses


@pytest.mark.parametrize(("layout", "sizes", "bits"), LAYOUTS)
def test_sampling_is_reproducible_valid_and_guided_exactly(layout, sizes, bits) -> None:
    prior = make_prior(layout, sizes, bits)

    def draw(seed: int, **kw) -> torch.Tensor:
        return prior.sample_codes(5, generator=torch.Generator().manual_seed(seed), **kw)

    labels = torch.tensor([3, 1, 4, 1, 5])
    codes = draw(0, labels=labels)
    assert codes.shape == (5, *GRID, len(sizes))
    for q, size in enumerate(sizes):
        assert codes[..., q].min() >= 0 and codes[..., q].max() < size
    assert torch.equal(draw(0, labels=labels), codes)  # same seed, same samples
    assert not torch.equal(draw(1, labels=labels), codes)
    # guidance through the doubled batch: scale 1 is conditional, scale 0 unconditional
    assert torch.equal(draw(0, labels=labels, cfg_scale=1.0), codes)
    unconditional = draw(0, labels=torch.full((5,), -1))
    assert torch.equal(draw(0, labels=labels, cfg_scale=0.0), unconditional)
    assert not torch.equal(unconditional, codes)
    assert not torch.equal(draw(0, labels=labels, cfg_scale=3.0), codes)


def test_greedy_sampling_takes_the_argmax_of_the_constrained_logits() -> None:
    prior = make_prior("flatten").eval()
    tokens = sample_tokens(prior.net, torch.tensor([2, 7]), 2, temperature=0.0)
    logits, _ = prior.net(tokens[:, :-1])
    for t in range(1, tokens.shape[1]):
        constrained = prior.layout.constrain_logits(logits[:, t - 1], t)
        assert torch.equal(tokens[:, t], constrained.argmax(-1))


def test_expert_usage_of_shards_equals_the_union() -> None:
    prior = make_prior("flatten").eval()
    codes, labels = random_codes([12, 5], batch=8), torch.arange(8)
    union = prior.metrics_for("val")["moe"]
    shards = ExpertUsage(2, 4, 2)
    with torch.no_grad():
        prior.shared_step((codes, labels), "val")
        for part in (slice(0, 3), slice(3, 8)):
            tokens = prior.layout.encode(codes[part], labels[part])
            _, out = prior.net(tokens[:, :-1])
            shards.update(out, tokens.shape[0] * (tokens.shape[1] - 1))
    whole, split = union.compute(), shards.compute()
    for name in ("load", "expert_utilization", "router_entropy", "z_loss"):
        torch.testing.assert_close(split[name], whole[name], msg=name)
    assert torch.allclose(whole["load"].sum(-1), torch.ones(2))
    assert 0.25 < float(whole["expert_utilization"]) <= 1.0


def test_logged_names_are_the_declared_ones() -> None:
    prior = make_prior("flatten")
    prior.shared_step((random_codes([12, 5]), torch.arange(6)), "val")
    logged = {}
    for name, metric in prior.metrics_for("val").items():
        logged.update(prior.metric_values("val", name, metric))
    assert set(logged) == set(prior.epoch_metric_names("val"))
    for name in ("val/nll", "val/bits_per_token", "val/perplexity", "val/moe/expert_utilization"):
        assert name in logged
    assert "val/moe/1/load/3" in logged


def test_bad_input_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="CodePrior needs codebook_sizes, grid"):
        CodePrior(NET)
    prior = make_prior("flatten")
    codes = random_codes([12, 5])
    codes[0, 0, 0, 0] = 12  # outside slot 0's codebook
    with pytest.raises(ValueError, match=r"slot 0 must lie in \[0, 12\)"):
        prior.shared_step((codes, torch.arange(6)), "train")
    with pytest.raises(ValueError, match="class-conditional but the batch has no labels"):
        prior.shared_step((random_codes([12, 5]), torch.full((6,), -1)), "train")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        CodePrior({**NET, "max_position_embeddings": 8}, codebook_sizes=[4], grid=[3, 3],
                  num_classes=0)  # fmt: skip
    unconditional = make_prior("flatten", classes=0)
    with pytest.raises(ValueError, match="labels given to an unconditional prior"):
        unconditional.sample_codes(2, labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="cfg_scale needs a class-conditional prior"):
        unconditional.sample_codes(2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        prior.sample_codes(2, top_p=1.5)
