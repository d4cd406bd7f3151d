"""GrokLM against an independent float64 reading of grok1.md; checkpoint loading; size."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.models.grok import GrokConfig, GrokLM
from src.models.grok_ops import rope_cos_sin
from tests.models import grok_reference as ref
from tests.models.grok_reference import one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "prior"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def loaded() -> tuple[GrokConfig, dict, torch.Tensor, torch.Tensor]:
    """Tiny config, its random checkpoint, input ids and the reference logits."""
    cfg = ref.tiny_config()
    weights = ref.random_checkpoint(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    return cfg, weights, ids, ref.logits(weights, cfg, ids)


def load(cfg: GrokConfig, weights: dict, dtype: torch.dtype) -> GrokLM:
    lm = GrokLM(cfg).to(dtype)
    assert lm.load_weights(weights.items()) == set(weights)
    return lm


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logits_equal_the_reference(loaded, dtype: torch.dtype) -> None:
    cfg, weights, ids, expected = loaded
    got = load(cfg, weights, dtype)(ids)
    assert got.dtype == dtype
    assert rel_err(got, expected) < 1e-5


def test_the_soft_caps_work_in_their_nonlinear_range(loaded) -> None:
    """The checkpoint drives router logits and attention scores well past 30, where
    30 tanh(x/30) differs from x; otherwise the cap ablations below would prove little."""
    cfg, weights, ids, _ = loaded
    x = ref.rms(weights["model.embed_tokens.weight"][ids[0]] * cfg.embedding_multiplier_scale,
                weights["model.layers.0.pre_moe_norm.scale"], cfg.rms_norm_eps)  # fmt: skip
    assert (x @ weights["model.layers.0.moe_block.gate.weight"].T).abs().max() > 60


ABLATIONS = [
    "router_cap",
    "attn_cap",
    "embedding_multiplier",
    "output_multiplier",
    "neox_rope",
    "post_norms",
]


@pytest.mark.parametrize("feature", ABLATIONS)
def test_each_feature_matters_to_the_logits(loaded, feature: str) -> None:
    """Switching any one feature off in the reference moves the logits far beyond the 1e-5
    tolerance above, so an implementation without it would fail that test."""
    cfg, weights, ids, expected = loaded
    ablated = ref.logits(weights, cfg, ids, ref.Ablation(**{feature: False}))
    assert rel_err(ablated, expected) > 1e-3


def block_input(cfg: GrokConfig, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 10, cfg.hidden_size, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("ablate", [False, True])
def test_attention_block_output_and_its_multiplier(loaded, ablate: bool) -> None:
    """Before post_attn_norm the attention output multiplier shows: equal to the reference
    with it, far from the reference without it."""
    cfg, weights, _, _ = loaded
    lm = load(cfg, weights, torch.float64)
    x = block_input(cfg)
    t = x.shape[1]
    cos, sin = rope_cos_sin(torch.arange(t), cfg.head_dim, cfg.rope_theta, x.dtype)
    got = lm.layers[1].attn(x, cos, sin)
    ab = ref.Ablation(attn_output_multiplier=not ablate)
    expected = torch.stack([ref.attention(weights, "model.layers.1.", cfg, s, ab) for s in x])
    assert (rel_err(got, expected) > 0.1) if ablate else (rel_err(got, expected) < 1e-10)


@pytest.mark.parametrize("ablate", [False, True])
def test_moe_block_output_and_top2_renormalisation(loaded, ablate: bool) -> None:
    """Before post_moe_norm the top-2 renormalisation shows (a per-token scale). Small
    inputs keep the router soft, so the top-2 probabilities sum well below 1."""
    cfg, weights, _, _ = loaded
    lm = load(cfg, weights, torch.float64)
    x = 0.03 * block_input(cfg).view(-1, cfg.hidden_size)
    got, _ = lm.layers[0].moe_block(x)
    ab = ref.Ablation(renormalize=not ablate)
    expected = ref.moe(weights, "model.layers.0.", cfg, x, ab)
    assert (rel_err(got, expected) > 1e-3) if ablate else (rel_err(got, expected) < 1e-10)


def test_causality(loaded) -> None:
    """Changing token t never changes the logits before t; it does change those from t on."""
    cfg, weights, ids, _ = loaded
    lm = load(cfg, weights, torch.float64)
    base = lm(ids)
    for t in (0, 5, 11):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
        out = lm(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert (out[:, t:] - base[:, t:]).abs().amax(dim=(0, 2)).min() > 1e-6


# ---- load_weights ----
def test_load_weights_accepts_a_tied_head_equal_to_the_embedding(loaded) -> None:
    cfg, weights, ids, expected = loaded
    lm = GrokLM(cfg).double()
    with_head = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()}
    assert lm.load_weights(with_head.items()) == set(with_head)
    assert rel_err(lm(ids), expected) < 1e-10


def test_load_weights_errors_list_every_problem(loaded) -> None:
    cfg, weights, _, _ = loaded
    bad = dict(weights)
    del bad["model.layers.1.moe_block.experts.2.linear_v.weight"]
    bad["model.layers.0.attn.k_proj.weight"] = torch.zeros(3, 3)
    bad["model.layers.7.attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as err:
        GrokLM(cfg).load_weights(bad.items())
    text = str(err.value)
    assert "1 unknown names: model.layers.7.attn.q_proj.weight" in text
    assert "1 missing names: model.layers.1.moe_block.experts.2.linear_v.weight" in text
    assert "model.layers.0.attn.k_proj.weight (3, 3) != (16, 32)" in text


def test_load_weights_rejects_a_tied_head_that_differs(loaded) -> None:
    cfg, weights, _, _ = loaded
    bad = {**weights, "lm_head.weight": torch.zeros_like(weights["model.embed_tokens.weight"])}
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from model\.embed_tokens"):
        GrokLM(cfg).load_weights(bad.items())


def test_untied_model_needs_and_uses_lm_head(loaded) -> None:
    cfg, weights, ids, _ = loaded
    untied = dataclasses.replace(cfg, tie_word_embeddings=False)
    with pytest.raises(ValueError, match=r"1 missing names: lm_head\.weight"):
        GrokLM(untied).load_weights(weights.items())
    with_head = {
        **weights,
        "lm_head.weight": torch.randn_like(weights["model.embed_tokens.weight"]),
    }
    lm = GrokLM(untied).double()
    assert lm.load_weights(with_head.items()) == set(with_head)
    got = lm(ids)
    assert rel_err(got, ref.logits(with_head, untied, ids)) < 1e-10
    assert rel_err(got, ref.logits(weights, cfg, ids)) > 1e-3  # the head makes the logits


def test_checkpoint_weights_round_trip(loaded) -> None:
    cfg, weights, ids, _ = loaded
    lm = load(cfg, weights, torch.float64)
    again = GrokLM(cfg).double()
    again.load_weights(lm.checkpoint_weights())
    torch.testing.assert_close(again(ids), lm(ids), rtol=0, atol=0)
    exported = dict(lm.checkpoint_weights())
    assert set(exported) == set(weights)
    assert all(torch.equal(exported[k], weights[k]) for k in weights)


# ---- sizes and configs ----
def test_grok1_config_has_315_684_820_992_parameters_on_meta() -> None:
    cfg = instantiate(OmegaConf.load(CONFIGS / "grok1.yaml"))
    assert cfg == GrokConfig()  # the yaml restates the defaults
    with torch.device("meta"):
        lm = GrokLM(cfg)
    assert sum(p.numel() for p in lm.parameters()) == 315_684_820_992


@pytest.mark.parametrize("name", ["grok_tiny", "grok_small"])
def test_small_configs_are_grokconfig_fields_with_derived_multipliers(name: str) -> None:
    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    raw.pop("_target_")
    assert set(raw) == {f.name for f in dataclasses.fields(GrokConfig)}
    cfg = GrokConfig(**raw)
    derived = GrokConfig.multipliers_for(cfg.hidden_size, cfg.num_attention_heads)
    assert {k: getattr(cfg, k) for k in derived} == pytest.approx(derived, rel=1e-12)
    assert cfg.num_experts == 8 and cfg.num_experts_per_tok == 2
    assert 4 <= cfg.num_hidden_layers <= 8 and 128 <= cfg.hidden_size <= 512
