"""Evaluate-continuously: find checkpoints as a training run writes them, each step once.

`CheckpointWatcher.run(evaluate)` polls a checkpoint directory, calls ``evaluate(path, step)``
for every checkpoint with a global step above the last one evaluated, in increasing step order,
and returns when the run is over or the directory has been idle too long:

- over: train.py wrote `final.json` (`{"global_step": N, ...}`, see src/utils/run_controller.py)
  and step N has been evaluated;
- idle: no new step for `idle_timeout` seconds (covers runs that died or were stopped).

A file that does not load yet (still being copied in by another tool) is retried at the next
poll. Several files holding one step (last.ckpt and step_XXXXXXX.ckpt) count as one
checkpoint; a step at or below the last evaluated one is never evaluated again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from src.utils.resume import read_checkpoint
from src.utils.run_controller import FINAL_MARKER

log = logging.getLogger(__name__)


class WatchDirError(FileNotFoundError):
    """The directory to watch does not exist."""


def checkpoint_directory(path: str | Path) -> Path:
    """``path`` itself, or ``path/checkpoints`` when given a run directory; must exist."""
    directory = Path(path).expanduser()
    if (directory / "checkpoints").is_dir():
        return directory / "checkpoints"
    if not directory.is_dir():
        raise WatchDirError(
            f"watch directory not found: {directory}. Pass a run's checkpoint directory "
            "(logs/train/runs/<run_name>/checkpoints) or its run directory; start the training "
            "run first (train.py run_name=<name>) so that the directory exists"
        )
    return directory


@dataclass
class CheckpointWatcher:
    """Polls ``directory`` every ``poll_seconds``; gives up after ``idle_timeout`` quiet seconds."""

    directory: Path
    poll_seconds: float = 10.0
    idle_timeout: float = 3600.0
    evaluated: list[int] = field(default_factory=list)
    _seen: dict[Path, tuple[int, int]] = field(default_factory=dict)
    _steps: dict[int, Path] = field(default_factory=dict)

    def scan(self) -> list[tuple[int, Path]]:
        """New checkpoints (step, path) above the last evaluated step, in step order."""
        for path in sorted(self.directory.glob("*.ckpt")):
            try:
                stat = path.stat()
            except FileNotFoundError:  # rotated away between glob and stat
                continue
            signature = (stat.st_mtime_ns, stat.st_size)
            if self._seen.get(path) == signature:
                continue
            try:
                step = int(read_checkpoint(path)["global_step"])
            except Exception as error:
                log.info("not (yet) loadable, retrying later: %s (%s)", path, error)
                continue
            self._seen[path] = signature
            # prefer a file that keeps its step (step_*, epoch_*) over last.ckpt, rewritten later
            if step not in self._steps or self._steps[step].name == "last.ckpt":
                self._steps[step] = path
        last = self.evaluated[-1] if self.evaluated else -1
        return sorted((step, path) for step, path in self._steps.items() if step > last)

    def final_step(self) -> int | None:
        """The step in the run's final marker, if training has finished."""
        marker = self.directory / FINAL_MARKER
        try:
            return int(json.loads(marker.read_text())["global_step"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def run(
        self,
        evaluate: Callable[[Path, int], None],
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> str:
        """Evaluate until the run is over ("final") or idle ("idle"); returns which."""
        clock = clock or time.monotonic
        sleep = sleep or time.sleep
        last_new = clock()
        while True:
            for step, path in self.scan():
                try:
                    evaluate(path, step)
                except FileNotFoundError:  # deleted by checkpoint rotation before its turn
                    log.warning("checkpoint of step %d vanished before evaluation: %s", step, path)
                    self._steps.pop(step, None)
                    continue
                self.evaluated.append(step)
                last_new = clock()
            final = self.final_step()
            if final is not None and self.evaluated and self.evaluated[-1] >= final:
                log.info("final checkpoint (step %d) evaluated: stopping", final)
                return "final"
            if clock() - last_new >= self.idle_timeout:
                log.info("no new checkpoint for %.0f s: stopping", self.idle_timeout)
                return "idle"
            sleep(self.poll_seconds)
