"""Entropy kernels of binary codebooks vs brute force over all 2^d codes; the all-reduce."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from scripts.bench_common import peak_rss_rise_mib, reset_peak_rss
from src.quantizers.collectives import differentiable_all_reduce_sum
from src.quantizers.kernels.entropy import (
    batch_entropy,
    bit_groups,
    bit_logits,
    code_probability_sums,
    per_sample_entropy,
)


def all_codes(bits: int, scale: float = 1.0) -> torch.Tensor:
    """Every code of {-scale, +scale}^bits, MSB first, float64."""
    index = torch.arange(2**bits).unsqueeze(-1)
    weights = 2 ** torch.arange(bits - 1, -1, -1)
    return torch.where((index & weights) != 0, scale, -scale).double()


def brute_force_probs(x: torch.Tensor, inv_temperature: float, scale: float) -> torch.Tensor:
    """Softmax over all codes of the distance logits 2 * inv_temperature * <x, c>."""
    codes = all_codes(x.shape[-1], scale)
    return (2 * inv_temperature * x.double() @ codes.t()).softmax(dim=-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(dim=-1)


@pytest.mark.parametrize("bits", [1, 5, 12])
@pytest.mark.parametrize(("inv_temperature", "scale"), [(1.0, 1.0), (100.0, 0.25)])
def test_per_sample_entropy_equals_brute_force(bits, inv_temperature, scale) -> None:
    x = torch.randn(64, bits, dtype=torch.float64) * 0.1
    got = per_sample_entropy(bit_logits(x, inv_temperature, scale))
    want = entropy(brute_force_probs(x, inv_temperature, scale))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bits", [1, 3, 8, 12])
def test_code_probability_sums_equal_brute_force(bits: int) -> None:
    x = torch.randn(50, bits, dtype=torch.float64)
    got = code_probability_sums(bit_logits(x, 1.0, 0.5)).flatten()
    want = brute_force_probs(x, 1.0, 0.5).sum(dim=0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bits", [2, 7, 12])
def test_batch_entropy_and_gradient_equal_brute_force(bits: int) -> None:
    x = (torch.randn(40, bits, dtype=torch.float64) * 0.3).requires_grad_()
    got = batch_entropy(bit_logits(x, 2.0, 1.0))
    (grad_got,) = torch.autograd.grad(got, x)
    want = entropy(brute_force_probs(x, 2.0, 1.0).mean(dim=0))
    (grad_want,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-7, atol=1e-10)


def test_batch_entropy_keeps_leading_dims() -> None:
    logits = torch.randn(3, 20, 6, dtype=torch.float64)
    got = batch_entropy(logits)
    assert got.shape == (3,)
    for c in range(3):
        torch.testing.assert_close(got[c], batch_entropy(logits[c]))


def test_gradcheck_float64() -> None:
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(batch_entropy, (logits,))
    assert torch.autograd.gradcheck(lambda u: batch_entropy(u, max_exact_bits=2), (logits,))
    assert torch.autograd.gradcheck(per_sample_entropy, (logits,))


def test_saturated_logits_give_finite_values_and_gradients() -> None:
    logits = torch.tensor([[400.0, -400.0, 0.0], [400.0, 400.0, 1e4]], requires_grad=True)
    value = batch_entropy(logits) + per_sample_entropy(logits).sum()
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_bit_groups() -> None:
    assert bit_groups(16, 16) == [(0, 16)]
    assert bit_groups(18, 16) == [(0, 9), (9, 18)]
    assert bit_groups(32, 16) == [(0, 16), (16, 32)]
    assert bit_groups(7, 3) == [(0, 3), (3, 5), (5, 7)]


def realistic_logits(tokens: int, bits: int, seed: int) -> torch.Tensor:
    """Encoder-like latents: a low-rank mix of 8 factors plus noise, so bits are correlated."""
    gen = torch.Generator().manual_seed(seed)
    factors = torch.randn(tokens, 8, generator=gen, dtype=torch.float64)
    mixing = torch.randn(8, bits, generator=gen, dtype=torch.float64) / 8**0.5
    x = factors @ mixing + 0.5 * torch.randn(tokens, bits, generator=gen, dtype=torch.float64)
    return bit_logits(x, inv_temperature=1.0, code_scale=1.0)


# Measured maximum relative error (grouped - exact) / exact over seeds 0-2, 4096 tokens, two
# groups of bits/2 (docs/benchmarks.md): correlated 5.3% / 7.0% / 7.5% at 12 / 14 / 16 bits,
# independent 0.5% / 1.0% / 2.1%. The bounds below leave a small margin over those.
@pytest.mark.parametrize(
    ("bits", "correlated_bound", "independent_bound"),
    [(12, 0.06, 0.007), (14, 0.08, 0.013), (16, 0.085, 0.025)],
)
def test_grouped_bound_is_an_upper_bound_close_to_exact(
    bits: int, correlated_bound: float, independent_bound: float
) -> None:
    for seed in range(3):
        independent = bit_logits(
            torch.randn(4096, bits, generator=torch.Generator().manual_seed(seed)).double(),
            1.0,
            1.0,
        )
        for logits, bound in (
            (realistic_logits(4096, bits, seed), correlated_bound),
            (independent, independent_bound),
        ):
            exact = batch_entropy(logits)
            grouped = batch_entropy(logits, max_exact_bits=bits // 2)
            assert grouped >= exact - 1e-9  # subadditivity: an upper bound
            assert (grouped - exact) / exact < bound


def test_exact_batch_entropy_memory_is_tokens_times_sqrt_codes() -> None:
    """8192 tokens x 2^16 codes would be 2 GiB in float32; the (hi, lo) path needs ~25 MiB."""
    logits = torch.randn(8192, 16, requires_grad=True)
    baseline = reset_peak_rss()
    batch_entropy(logits).backward()
    assert peak_rss_rise_mib(baseline) < 200


class ThreadRanks:
    """A fake 2-rank communicator: each rank is a thread; all_reduce sums via a barrier."""

    def __init__(self, world_size: int = 2) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.local = threading.local()

    @property
    def rank(self) -> int:
        return self.local.rank

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        self.slots[self.rank] = tensor.detach().clone()
        self.barrier.wait()
        total = sum(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return total / self.world_size if op == "mean" else total

    def run_each(self, fn: Callable[[int], None]) -> None:
        """Run `fn(rank)` on one thread per rank (this communicator's rank set) and wait."""

        def as_rank(rank: int) -> None:
            self.local.rank = rank
            fn(rank)

        threads = [threading.Thread(target=as_rank, args=(r,)) for r in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)


def test_differentiable_all_reduce_over_two_fake_ranks() -> None:
    """Each rank's batch entropy is that of the union; gradients are those of the sum of the
    ranks' losses (2 x the single-process entropy of the union)."""
    torch.manual_seed(0)
    shards = [torch.randn(30, 10, dtype=torch.float64) for _ in range(2)]
    comm = ThreadRanks()
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def run(rank: int) -> None:
        comm.local.rank = rank
        x = shards[rank].clone().requires_grad_()
        reduce_sum = lambda t: differentiable_all_reduce_sum(t, comm)  # noqa: E731
        value = batch_entropy(bit_logits(x, 1.0, 1.0), max_exact_bits=6, reduce_sum=reduce_sum)
        value.backward()
        results[rank] = (value.detach(), x.grad)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    union = torch.cat(shards).requires_grad_()
    want = batch_entropy(bit_logits(union, 1.0, 1.0), max_exact_bits=6)
    (grad,) = torch.autograd.grad(2 * want, union)
    for rank in range(2):
        value, got_grad = results[rank]
        torch.testing.assert_close(value, want.detach())
        torch.testing.assert_close(got_grad, grad[30 * rank : 30 * (rank + 1)])


def test_all_reduce_is_identity_on_one_process() -> None:
    from src.quantizers.communicator import SINGLE_PROCESS

    t = torch.randn(3, requires_grad=True)
    assert differentiable_all_reduce_sum(t, SINGLE_PROCESS) is t
