"""Whether a run failed: train.py writes `<run dir>/failed.json` when a run stops with an error
(not on preemption, which exits to be resumed), and removes it when the run starts again.
scripts/compare.py reads it to mark failed runs instead of showing them as blank results."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FAILED_MARKER = "failed.json"


@contextmanager
def record_failure(
    run_dir: Path, write: bool = True, not_failures: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Clear the run's failure marker, run the body, and write the marker if it raises (the
    exception propagates); exceptions of `not_failures` (a preemption: exit to be resumed) write
    nothing. `write=False` on ranks other than 0 of a launch, so that one process writes it."""
    marker = Path(run_dir) / FAILED_MARKER
    if write:
        marker.unlink(missing_ok=True)
    try:
        yield
    except not_failures:
        raise
    except BaseException as error:
        if write and marker.parent.is_dir():
            record = {"error": f"{type(error).__name__}: {error}".strip(), "pid": os.getpid()}
            partial = marker.with_name(f".{FAILED_MARKER}.partial")
            partial.write_text(json.dumps(record) + "\n")
            partial.replace(marker)
        raise


def read_failure(run_dir: Path) -> dict[str, Any] | None:
    """The failure record of a run directory (`error`: type and message), None if none."""
    marker = Path(run_dir) / FAILED_MARKER
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {"error": "unreadable failure record"}
    return record if isinstance(record, dict) else {"error": str(record)}
