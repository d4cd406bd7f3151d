"""The grouped (sorted, dropless) MoE against a naive per-expert loop; losses; autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src.models.grok import GrokConfig, GrokLM
from src.models.grok_moe import GrokMoE
from tests.models.grok_reference import one_thread, tiny_config

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def make_moe(backend: str, seed: int = 0, experts: int = 8) -> GrokMoE:
    cfg = tiny_config(num_experts=experts, moe_backend=backend)
    torch.manual_seed(seed)
    moe = GrokMoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    torch.nn.init.normal_(moe.w_in, std=0.3)
    torch.nn.init.normal_(moe.w_out, std=0.3)
    return moe


def naive_moe(moe: GrokMoE, x: torch.Tensor) -> torch.Tensor:
    """Mixtral-style: route, then for every expert scan all tokens with a boolean mask."""
    logits = moe.cap * torch.tanh(x @ moe.gate.weight.T / moe.cap)
    probs = torch.softmax(logits, -1)
    weights, experts = probs.topk(moe.top_k, -1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    f = moe.ffn
    for e in range(moe.num_experts):
        token, slot = torch.nonzero(experts == e, as_tuple=True)
        w_gate, w_up, w_down = moe.w_in[e, :f], moe.w_in[e, f:], moe.w_out[e]
        xe = x[token]
        ye = (F.gelu(xe @ w_gate.T) * (xe @ w_up.T)) @ w_down.T
        out = out.index_add(0, token, ye * weights[token, slot, None])
    return out


def grads(moe: GrokMoE, fn, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = fn(x)
    out = out[0] if isinstance(out, tuple) else out
    (out * g).sum().backward()
    return [out.detach(), x.grad, moe.gate.weight.grad, moe.w_in.grad, moe.w_out.grad]


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_grouped_moe_equals_the_naive_loop_in_values_and_gradients(backend: str) -> None:
    moe = make_moe(backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 32, generator=g)
    upstream = torch.randn(3, 40, 32, generator=g)
    ours = grads(moe, moe, x, upstream)
    naive = grads(moe, lambda t: naive_moe(moe, t.view(-1, 32)).view(t.shape), x, upstream)
    names = ["output", "input grad", "router grad", "w_in grad", "w_out grad"]
    for name, a, b in zip(names, ours, naive, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert ours[2].abs().max() > 1e-3  # the router does learn through the top-k weights


def test_no_token_is_dropped_when_all_go_to_two_experts() -> None:
    """Every token routed to experts 5 and 2 (full load there, none elsewhere): each token's
    output is still its own two-expert mixture."""
    moe = make_moe("auto")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 32, generator=g)
    x[:, 0] = 4.0
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[5, 0] = 3.0
        moe.gate.weight[2, 0] = 2.9
    out, stats = moe(x)
    assert stats.expert_load.tolist() == [0, 0, 0.5, 0, 0, 0.5, 0, 0]
    torch.testing.assert_close(out, naive_moe(moe, x), rtol=1e-5, atol=1e-5)
    assert out.abs().amax(-1).min() > 0


def test_losses_and_statistics_at_a_uniform_router() -> None:
    """Zero router weights: softmax uniform, so load-balancing loss E * sum f_e / E = 1,
    z-loss = log(E)^2, entropy = log(E), whatever the (tied) top-k picks."""
    moe = make_moe("auto")
    with torch.no_grad():
        moe.gate.weight.zero_()
    _, stats = moe(torch.randn(64, 32))
    assert stats.load_balance_loss.item() == pytest.approx(1.0, rel=1e-6)
    assert stats.z_loss.item() == pytest.approx(math.log(8) ** 2, rel=1e-6)
    assert stats.router_entropy.item() == pytest.approx(math.log(8), rel=1e-6)
    assert stats.expert_load.sum().item() == pytest.approx(1.0)


def test_load_balancing_loss_and_z_loss_equal_their_formulas() -> None:
    moe = make_moe("auto")
    x = torch.randn(100, 32, generator=torch.Generator().manual_seed(4))
    _, stats = moe(x)
    logits = 30 * torch.tanh(x @ moe.gate.weight.T / 30)
    probs = torch.softmax(logits, -1)
    top = probs.topk(2, -1).indices
    f = torch.stack([(top == e).sum() for e in range(8)]).float() / 200
    torch.testing.assert_close(stats.expert_load, f)
    torch.testing.assert_close(stats.load_balance_loss, 8 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(stats.z_loss, torch.logsumexp(logits, -1).pow(2).mean())
    entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(stats.router_entropy, entropy)
    moe.zero_grad()
    stats.load_balance_loss.backward()
    assert moe.gate.weight.grad.abs().max() > 0  # the balancing loss trains the router


def test_bf16_autocast_keeps_the_router_in_float32() -> None:
    moe = make_moe("auto")
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    plain = moe.route(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = moe.route(x)
        out, stats = moe(x)
    assert routed.probs.dtype == torch.float32 and stats.z_loss.dtype == torch.float32
    torch.testing.assert_close(routed.probs, plain.probs, rtol=0, atol=0)
    assert torch.equal(routed.experts, plain.experts)
    assert out.dtype == x.dtype
    exact = moe(x)[0]
    assert (out - exact).abs().max() < 0.02 * exact.abs().max()  # bf16 experts, same routing


def test_forward_train_under_autocast_trains() -> None:
    cfg = tiny_config()
    torch.manual_seed(0)
    lm = GrokLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm.forward_train(ids)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), ids.flatten()) + out.aux_loss
    loss.backward()
    assert out.aux_loss.dtype == torch.float32
    assert out.expert_load.shape == (2, 4) and out.router_entropy.shape == (2,)
    torch.testing.assert_close(out.expert_load.sum(-1), torch.ones(2))
    expected = (
        cfg.router_aux_loss_coef * out.load_balance_loss + cfg.router_z_loss_coef * out.z_loss
    )
    torch.testing.assert_close(out.aux_loss, expected)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.parameters())


def test_grouped_mm_backend_refuses_float64_with_a_clear_error() -> None:
    moe = make_moe("grouped_mm").double()
    with pytest.raises(RuntimeError, match="moe_backend='auto' or 'loop'"):
        moe(torch.randn(4, 32, dtype=torch.float64))


def test_config_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        GrokConfig(num_attention_heads=6, num_key_value_heads=4)


def test_auto_backend_runs_segments_on_cpu_and_grouped_mm_under_compile(monkeypatch) -> None:
    """auto: per-expert segments in eager CPU (faster there, docs/benchmarks.md), the grouped
    custom ops while torch.compile traces (no data-dependent loop); loop / grouped_mm force."""
    from src.models import grok_grouped

    xs, w_in, w_out = torch.randn(8, 32), torch.randn(4, 64, 32), torch.randn(4, 32, 32)
    assert not grok_grouped.use_grouped(xs, w_in, w_out, "auto")
    assert grok_grouped.use_grouped(xs, w_in, w_out, "grouped_mm")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert grok_grouped.use_grouped(xs, w_in, w_out, "auto")
    assert not grok_grouped.use_grouped(xs, w_in, w_out, "loop")
    # where the kernel does not run (float64) auto falls back to the segments
    assert not grok_grouped.use_grouped(xs.double(), w_in.double(), w_out.double(), "auto")
