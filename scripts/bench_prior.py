"""Speed and memory of the Grok prior's parts (issue 13), 2 CPU threads (--threads), float32.

    python scripts/bench_prior.py                  # all four sections, markdown on stdout
    python scripts/bench_prior.py --only moe,decode  # some of: moe, decode, attention, compile

(a) moe: one MoE layer forward+backward (hidden 256, ffn 1024, 8 experts, top-2, 8192 tokens):
    ours (sorted by expert; per-expert segments on CPU) vs our torch._grouped_mm backend, vs
    the Hugging Face Mixtral loop (per expert, a boolean mask over all tokens picks its rows),
    vs a loop that runs every expert on every token and masks the weights, and vs a dense
    GELU-gated FFN of width 2 x 1024 (the same active FLOPs); with each one's GFLOP/s of
    active work and the machine's plain matmul rate (a 2048^3 float32 GEMM) for scale.
(b) decode: tokens/s of batch-16 decoding with the KV cache vs recomputing the whole prefix,
    4 layers, hidden 256, at contexts 512 and 2048; the cache's bytes per token.
(c) attention: peak memory of one attention forward at T=4096 (hidden 256, 8 heads): query
    blocks of 512 vs one block holding the full (heads, T, T) scores.
(d) compile: forward+backward of the training forward (grok_tiny sizes, 8 x 256 tokens),
    eager vs torch.compile (compile time reported apart).
Times are medians over alternating steps (scripts/bench_common.py); peak memory is the rise of
the resident-set high-water mark over one step, with glibc tuned as bench_common does. Each
section runs in its own Python process, so no section's heap is shaped by the one before
(in one process the attention peak read 435 MiB after the MoE section, 149 MiB alone).
"""

# ruff: noqa: E402  (imports follow the sys.path fix below)
from __future__ import annotations

import sys
from pathlib import Path

# run as a script, Python puts scripts/ first on sys.path, where scripts/tokenize.py would
# shadow the standard library's tokenize (imported by torch): drop that entry
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scripts.bench_common import Case, bench_case, peak_of_one_step
from src.models.grok import GrokConfig, GrokLM
from src.models.grok_attention import GrokAttention
from src.models.grok_moe import GrokMoE
from src.models.grok_ops import rope_cos_sin

HIDDEN, FFN, EXPERTS, TOP_K, TOKENS = 256, 1024, 8, 2, 8192


def config(**overrides) -> GrokConfig:
    fields = dict(
        vocab_size=1024,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=4096,
        **GrokConfig.multipliers_for(HIDDEN, 8),
    )
    return GrokConfig(**{**fields, **overrides})


# ---- (a) MoE layer ----
class Ours(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.moe = GrokMoE(config())

    def forward(self, x: Tensor) -> Tensor:
        return self.moe(x)[0]


class OursGroupedMM(Ours):
    """Ours with moe_backend='grouped_mm' (the GPU and torch.compile path) forced on CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.moe = GrokMoE(config(moe_backend="grouped_mm"))


class MixtralLoop(Ours):
    """Hugging Face Mixtral style: per expert, a boolean mask over all (token, slot) pairs
    finds its rows (torch.where), which are gathered, run and index-added back."""

    def forward(self, x: Tensor) -> Tensor:
        moe = self.moe
        routing = moe.route(x)
        mask = F.one_hot(routing.experts, moe.num_experts).permute(2, 1, 0)  # (E, k, N)
        out = torch.zeros_like(x)
        f = moe.ffn
        for e in range(moe.num_experts):
            slot, token = torch.where(mask[e])
            xe = x[token]
            h = F.gelu(xe @ moe.w_in[e, :f].t()) * (xe @ moe.w_in[e, f:].t())
            y = (h @ moe.w_out[e].t()) * routing.weights[token, slot, None]
            out.index_add_(0, token, y.to(x.dtype))
        return out


class MaskAllTokens(Ours):
    """Every expert on every token, its output weighted by a routing weight that is zero
    where the token was not routed to it (E/k times the active FLOPs)."""

    def forward(self, x: Tensor) -> Tensor:
        moe = self.moe
        routing = moe.route(x)
        dense = torch.zeros(x.shape[0], moe.num_experts, dtype=x.dtype)
        dense = dense.scatter(1, routing.experts, routing.weights)
        out = torch.zeros_like(x)
        f = moe.ffn
        for e in range(moe.num_experts):
            h = F.gelu(x @ moe.w_in[e, :f].t()) * (x @ moe.w_in[e, f:].t())
            out = out + (h @ moe.w_out[e].t()) * dense[:, e, None]
        return out


class DenseFFN(nn.Module):
    """GELU-gated FFN of width top_k x ffn: what the MoE computes per token, minus routing."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up = nn.Linear(HIDDEN, 2 * TOP_K * FFN, bias=False)
        self.down = nn.Linear(TOP_K * FFN, HIDDEN, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.gelu(gate) * up)


# forward FLOPs of the active work: N*k rows through (hidden -> 2 x ffn) and (ffn -> hidden);
# backward is twice that (grad of inputs and of weights)
MOE_FLOPS = 3 * 2 * TOKENS * TOP_K * (HIDDEN * 2 * FFN + FFN * HIDDEN)


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matmul rate (GFLOP/s) on one n x n x n product: the ceiling
    for any MoE of equal active FLOPs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    return 2 * n**3 / median_time(lambda: a @ b, repeats) / 1e9


def bench_moe() -> list[str]:
    def make_input() -> Tensor:
        return torch.randn(TOKENS, HIDDEN)

    rows = [
        "| MoE fwd+bwd, 8192 tokens | s/step | GFLOP/s (active) | peak MiB | ours is faster by |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    ours = None
    for name, build in (
        ("ours with the torch._grouped_mm backend", OursGroupedMM),
        ("HF Mixtral loop (boolean mask per expert)", MixtralLoop),
        ("every expert on every token, masked weights", MaskAllTokens),
        ("dense GELU-gated FFN, width 2 x 1024 (floor)", DenseFFN),
    ):
        case = Case(name, TOKENS, make_input, Ours, build, steps=3)
        result = bench_case(case)
        if ours is None:
            ours = result["ours"]
            name_ours = "ours (sorted by expert; per-expert segments on CPU)"
            rows.append(
                f"| {name_ours} | {ours.seconds_per_step:.3f} "
                f"| {MOE_FLOPS / ours.seconds_per_step / 1e9:.0f} | {ours.peak_mib:.0f} | - |"
            )
        ref = result["reference"]
        speed = ref.seconds_per_step / result["ours"].seconds_per_step
        rows.append(
            f"| {name} | {ref.seconds_per_step:.3f} | {MOE_FLOPS / ref.seconds_per_step / 1e9:.0f} "
            f"| {ref.peak_mib:.0f} | {speed:.2f}x |"
        )
    rows.append(f"| plain 2048^3 float32 matmul (the ceiling) | | {gemm_gflops():.0f} | | |")
    return rows


# ---- (b) decoding ----
def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def bench_decode() -> list[str]:
    torch.manual_seed(0)
    cfg = config(intermediate_size=512)
    lm = GrokLM(cfg).eval()
    batch, steps = 16, 8
    rows = [
        "| context | cached tok/s | recompute tok/s | speed-up | cache bytes/token |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for context, repeats in ((512, 2), (2048, 1)):
        ids = torch.randint(0, cfg.vocab_size, (batch, context + steps))
        full = median_time(lambda ids=ids, c=context: lm(ids[:, :c]), repeats)
        cache = lm.new_cache(batch, context + steps)
        lm.forward_with_cache(ids[:, :context], cache)
        one = []
        for t in range(context, context + steps):
            start = time.perf_counter()
            lm.forward_with_cache(ids[:, t : t + 1], cache)
            one.append(time.perf_counter() - start)
        cached = statistics.median(one)
        expected = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
        assert cache.bytes_per_token() == expected
        assert cache.nbytes() == batch * (context + steps) * expected
        rows.append(
            f"| {context} | {batch / cached:,.0f} | {batch / full:,.1f} | {full / cached:,.0f}x "
            f"| {cache.bytes_per_token():,} (= 2*4*2*32*4) |"
        )
    return rows


# ---- (c) attention memory ----
@torch.no_grad()
def bench_attention() -> list[str]:
    t = 4096
    rows = ["| attention forward, T=4096 | peak MiB | s |", "| --- | ---: | ---: |"]
    peaks = {}
    for name, chunk in (
        ("query blocks of 512 (ours)", 512),
        ("one block: full (8, T, T) scores", 10**9),
    ):
        torch.manual_seed(0)
        attn = GrokAttention(config(num_key_value_heads=8, attn_query_chunk=chunk))
        x = torch.randn(1, t, HIDDEN)
        cos, sin = rope_cos_sin(torch.arange(t), attn.head_dim, 10000.0, x.dtype)

        def step(attn=attn, x=x, cos=cos, sin=sin) -> float:
            start = time.perf_counter()
            attn(x, cos, sin)
            return time.perf_counter() - start

        seconds = step()  # warm-up, timed
        peaks[name] = peak_of_one_step(step)
        rows.append(f"| {name} | {peaks[name]:.0f} | {seconds:.2f} |")
    ratio = peaks["query blocks of 512 (ours)"] / peaks["one block: full (8, T, T) scores"]
    rows.append(f"| ratio ours / full | {ratio:.3f} | |")
    return rows


# ---- (d) torch.compile ----
def bench_compile() -> list[str]:
    torch.manual_seed(0)
    cfg = config(hidden_size=128, num_attention_heads=4, intermediate_size=256,
                 **GrokConfig.multipliers_for(128, 4))  # fmt: skip
    lm = GrokLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (8, 256))

    def step(model: Callable) -> Callable[[], None]:
        def run() -> None:
            lm.zero_grad(set_to_none=True)
            out = model(ids, return_aux=True)
            (F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss).backward()

        return run

    compiled = torch.compile(lm)
    start = time.perf_counter()
    step(compiled)()
    compile_s = time.perf_counter() - start
    eager_s = median_time(step(lm), 5)
    fast_s = median_time(step(compiled), 5)
    return [
        "| training step (forward_train + backward), 8 x 256 tokens | s/step |",
        "| --- | ---: |",
        f"| eager | {eager_s:.3f} |",
        f"| torch.compile (inductor) | {fast_s:.3f} |",
        f"| speed-up | {eager_s / fast_s:.2f}x |",
        f"| first compiled step (compilation) | {compile_s:.0f} s |",
    ]


SECTIONS = {
    "moe": bench_moe,
    "decode": bench_decode,
    "attention": bench_attention,
    "compile": bench_compile,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--section-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.only.split(",")
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}: choose from {', '.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    if len(names) > 1:  # one fresh process per section (module docstring)
        cpu = platform.processor() or platform.machine()
        print(f"torch {torch.__version__}, {cpu}, {args.threads} threads, float32", flush=True)
        for name in names:
            command = [sys.executable, __file__, "--only", name, "--threads", str(args.threads)]
            subprocess.run([*command, "--section-only"], check=True)
        return
    start = time.perf_counter()
    rows = SECTIONS[names[0]]()
    if not args.section_only:
        print(f"torch {torch.__version__}, {args.threads} threads, float32")
    print(f"\n### {names[0]} ({time.perf_counter() - start:.0f} s)\n")
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
