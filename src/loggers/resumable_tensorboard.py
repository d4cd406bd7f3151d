"""A TensorBoard logger that a resumed run continues: same `<save_dir>/version_0/` directory.

Lightning's TensorBoardLogger picks the next free `version_N` when none is given, so every
attempt of a resumed run would be a separate TensorBoard run. This one writes `version_0` by
default, and on resume `roll_back(step)` starts its event file with TensorBoard's purge marker
at that step (`SummaryWriter(purge_step=step)`): TensorBoard then hides the events the killed
attempt logged at or after the checkpoint's step, which are about to be logged again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class ResumableTensorBoardLogger(TensorBoardLogger):
    """`TensorBoardLogger` writing `<save_dir>/<name>/version_<version>/`, version 0 by default,
    that appends to (and on resume, purges the replayed steps of) a previous attempt's run."""

    def __init__(
        self, save_dir: str | Path, name: str | None = "", version: int | str = 0, **kwargs: Any
    ) -> None:
        super().__init__(save_dir=save_dir, name=name, version=version, **kwargs)

    @rank_zero_only
    def roll_back(self, step: int) -> int:
        """Hide what an earlier attempt logged at global step >= ``step``. Must be called before
        the first event is written; returns 0 (events are hidden, not moved)."""
        if self._experiment is not None:
            raise RuntimeError("roll_back must come before the TensorBoard writer is created")
        if any(Path(self.log_dir).glob("events.out.tfevents.*")):
            self._kwargs["purge_step"] = int(step)
            log.info("TensorBoard: events of %s at step >= %d are purged", self.log_dir, step)
        return 0
