"""Shared machinery of the quantizer benchmarks: cases, timing, peak memory, the table.

A case builds our module and, optionally, the reference library's module on identical
inputs; both run forward+backward in training mode in this process, their timed steps
alternating so both see the same machine, and the reported time is each one's median step
(robust to scheduler noise on a shared machine).
Peak memory is the rise of the process's resident-set high-water mark (Linux VmHWM, reset
through /proc/self/clear_refs) over the resident size before one step, so it counts every
allocation torch makes on the CPU, not only tensors Python can see. During that step glibc
serves every block over 64 KiB by mmap and trims freed memory at once, so the step cannot
hide its allocations in free heap space that an earlier step left behind.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
_LIBC = ctypes.CDLL("libc.so.6")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


@dataclass
class Case:
    """One benchmark row: how to build each implementation and its input."""

    name: str
    tokens: int
    make_input: Callable[[], Tensor]
    ours: Callable[[], nn.Module]
    reference: Callable[[], nn.Module] | None = None
    # turns a module's output into the scalar that is backpropagated
    objective: Callable[[object, Tensor], Tensor] | None = None
    steps: int = 3
    notes: str = ""
    # skip the reference when it is known to need more than this machine has
    reference_skip_reason: str = ""


@dataclass
class Result:
    seconds_per_step: float
    peak_mib: float
    tokens_per_sec: float
    extra: dict[str, float] = field(default_factory=dict)


def _kib(field_name: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in {STATUS}")


def reset_peak_rss() -> int:
    """Reset the high-water mark; returns the current resident size in KiB."""
    gc.collect()
    CLEAR_REFS.write_text("5")
    return _kib("VmRSS")


def peak_rss_rise_mib(baseline_kib: int) -> float:
    return max(0, _kib("VmHWM") - baseline_kib) / 1024


def default_objective(output: object, x: Tensor) -> Tensor:
    """Sum of the quantized output against a fixed projection, plus any auxiliary loss."""
    quantized = output[0] if isinstance(output, tuple) else output
    value = quantized.float().mul(0.01).sum()
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, tuple) and len(output) > 2:
        loss = output[2]
    if isinstance(loss, Tensor):
        value = value + loss.float().sum()
    return value


# Fast cases repeat until this much time has passed (at most MAX_STEPS steps), so the median
# step rests on enough samples to shrug off scheduler noise on a shared machine.
MIN_SECONDS = 1.0
MAX_STEPS = 200


def make_step(module: nn.Module, x: Tensor, case: Case) -> Callable[[], float]:
    """One timed forward+backward step of `module` in training mode on a fresh copy of `x`."""
    objective = case.objective or default_objective
    module.train()

    def step() -> float:
        start = time.perf_counter()
        inputs = x.clone().requires_grad_(x.is_floating_point())
        module.zero_grad(set_to_none=True)
        objective(module(inputs), inputs).backward()
        return time.perf_counter() - start

    return step


def peak_of_one_step(step: Callable[[], float]) -> float:
    """Resident-memory rise (MiB) of a single step. Over many steps the resident size also
    collects allocator fragmentation, which says more about glibc than about the quantizer."""
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, 0)
    try:
        gc.collect()
        _LIBC.malloc_trim(0)
        baseline = reset_peak_rss()
        step()
        return peak_rss_rise_mib(baseline)
    finally:
        # glibc's 64-bit defaults as reached in steady state, for the timed steps
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)


def bench_case(case: Case, with_reference: bool = True) -> dict[str, Result | str]:
    """Run our implementation and (if given) the reference on the same input.

    Each is warmed up once (k-means init, lazy buffers, ...) and its peak memory taken from
    one step; then their timed steps alternate, ours then the reference's, so both see the
    same machine: at least `case.steps` each, more for fast cases (see MIN_SECONDS). The
    time reported is each one's median step.
    """
    torch.manual_seed(0)
    x = case.make_input()
    results: dict[str, Result | str] = {}
    steps: dict[str, Callable[[], float]] = {}
    peaks: dict[str, float] = {}
    modules = []
    for label, build in (("ours", case.ours), ("reference", case.reference)):
        if build is None or (label == "reference" and not with_reference):
            continue
        if label == "reference" and case.reference_skip_reason:
            results[label] = case.reference_skip_reason
            continue
        torch.manual_seed(0)
        modules.append(build())
        steps[label] = make_step(modules[-1], x, case)
        steps[label]()  # warm-up
        peaks[label] = peak_of_one_step(steps[label])
    durations: dict[str, list[float]] = {label: [] for label in steps}

    def more() -> bool:
        done = min((len(d) for d in durations.values()), default=case.steps)
        elapsed = sum(sum(d) for d in durations.values())
        return done < case.steps or (elapsed < MIN_SECONDS * len(steps) and done < MAX_STEPS)

    while more():
        for label, step in steps.items():
            durations[label].append(step())
    for label, times in durations.items():
        seconds = statistics.median(times)
        results[label] = Result(seconds, peaks[label], case.tokens / seconds)
    del modules
    gc.collect()
    return results


def markdown_table(rows: Sequence[tuple[Case, dict[str, Result | str]]]) -> str:
    """Ours vs reference: tokens/s, seconds per step, peak MiB, speed-up and memory ratio."""
    lines = [
        "| case | ours tok/s | ours s/step | ours peak MiB | ref tok/s | ref s/step | "
        "ref peak MiB | speed-up | memory ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, results in rows:
        ours, ref = results.get("ours"), results.get("reference")
        cells = [case.name]
        for r in (ours, ref):
            if isinstance(r, Result):
                cells += [
                    f"{r.tokens_per_sec:,.0f}",
                    f"{r.seconds_per_step:.4f}",
                    f"{r.peak_mib:.0f}",
                ]
            else:
                cells += [str(r or "-"), "-", "-"]
        if isinstance(ours, Result) and isinstance(ref, Result):
            cells.append(f"{ref.seconds_per_step / ours.seconds_per_step:.1f}x")
            # below 1 MiB the resident-size rise is page-granular noise, not a usable ratio
            if ref.peak_mib >= 1:
                cells.append(f"{ours.peak_mib / ref.peak_mib:.2f}")
            else:
                cells.append("both < 1 MiB" if ours.peak_mib < 1 else "-")
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
