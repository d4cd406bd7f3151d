"""Benchmark cases of the search keywords (issue 17): VectorQuantize `topk` and ResidualVQ
beam search, ours against vector-quantize-pytorch 1.32.0 with the same keywords and input
(imported by scripts/bench_quantizers.py). Training rows are forward+backward with the
codebook updates; "eval" rows keep the module in eval mode (the usual place for a wider
beam, `eval_beam_size`) and still backpropagate to the input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from scripts.bench_cases_vq import _ours, _reference, _sequence
from scripts.bench_common import Case

DIM = 256


class CallWith(nn.Module):
    """Calls the wrapped quantizer with fixed keywords; `eval_only` keeps it in eval mode
    whatever the harness sets (the harness always switches to training)."""

    def __init__(self, inner: nn.Module, eval_only: bool = False, **call: Any) -> None:
        super().__init__()
        self.inner = inner
        self.eval_only = eval_only
        self.call = call

    def train(self, mode: bool = True) -> CallWith:
        super().train(mode)
        if self.eval_only:
            self.inner.eval()
        return self

    def forward(self, x: Tensor) -> object:
        return self.inner(x, **self.call)


def _wrapped(
    build: Callable[[], nn.Module], eval_only: bool = False, **call: Any
) -> Callable[[], nn.Module]:
    return lambda: CallWith(build(), eval_only=eval_only, **call)


def cases() -> list[Case]:
    vq = {"dim": DIM, "codebook_size": 1024}
    rows = [
        Case(
            "vq topk=4 K=1024",
            2 * 1024,
            _sequence(2),
            _wrapped(_ours("VectorQuantize", **vq), topk=4),
            _wrapped(_reference("VectorQuantize", **vq), topk=4),
        ),
        Case(
            "vq topk=4 K=1024 eval",
            2 * 1024,
            _sequence(2),
            _wrapped(_ours("VectorQuantize", **vq), eval_only=True, topk=4),
            _wrapped(_reference("VectorQuantize", **vq), eval_only=True, topk=4),
        ),
    ]
    for beam, batch in ((2, 1), (4, 1)):
        rvq = {"dim": DIM, "num_quantizers": 8, "codebook_size": 1024, "beam_size": beam}
        rows += [
            Case(
                f"rvq 8x K=1024 beam={beam}",
                batch * 1024,
                _sequence(batch),
                _ours("ResidualVQ", **rvq),
                _reference("ResidualVQ", **rvq),
            ),
            Case(
                f"rvq 8x K=1024 beam={beam} eval",
                batch * 1024,
                _sequence(batch),
                _wrapped(_ours("ResidualVQ", **rvq), eval_only=True),
                _wrapped(_reference("ResidualVQ", **rvq), eval_only=True),
            ),
        ]
    return rows
