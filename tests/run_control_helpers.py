"""Test aids for the run-controller tests: a callback that holds a training subprocess at a
known step (so a test can kill or signal it there), and process helpers."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from lightning import Callback, LightningModule, Trainer

from tests.helpers import ROOT


class HoldAtStep(Callback):
    """After training step ``step``: write ``flag`` (a file), then wait up to ``seconds`` or until
    a preemption signal arrives (`Preemption.received`), whichever is first."""

    def __init__(self, step: int, flag: str, seconds: float = 120.0) -> None:
        self.step = int(step)
        self.flag = Path(flag)
        self.seconds = float(seconds)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step:
            return
        self.flag.write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            if any(getattr(cb, "received", None) is not None for cb in trainer.callbacks):
                return
            time.sleep(0.05)


def start_script(script: str, *args: str) -> subprocess.Popen[str]:
    """Start `python <script> args...` from the project root without waiting."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_file(path: Path, process: subprocess.Popen[str], timeout: float = 300.0) -> None:
    """Wait until ``path`` exists; fail with the process's output if it ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            _, err = process.communicate()
            raise AssertionError(f"process ended ({process.returncode}) first:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)
