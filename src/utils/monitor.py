"""The monitored metric of a run: which validation metric picks the best checkpoint and which
way is better. Set by the `monitor` node of the config (the model config fills it in)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MODES = {"max": "maximize", "min": "minimize"}


@dataclass(frozen=True)
class Monitor:
    metric: str
    mode: str


def check_mode(mode: object) -> str:
    """`max` or `min`, else a ValueError naming the choices."""
    if mode not in MODES:
        raise ValueError(
            f"monitor.mode must be 'max' (higher is better) or 'min' (lower is better), "
            f"got {mode!r}"
        )
    return str(mode)


def optuna_direction(mode: str) -> str:
    """The Optuna sweeper's `direction` for a monitor mode (resolver `optuna_direction`)."""
    return MODES[check_mode(mode)]


def monitor_of(config: Mapping[str, Any]) -> Monitor | None:
    """The run's monitor: its `monitor` node, else (configs stored before that node existed) the
    best-checkpoint callback's; None when the config has neither."""
    node = config.get("monitor")
    if not node:
        node = (config.get("callbacks") or {}).get("model_checkpoint")
        if not node:
            return None
        node = {"metric": node.get("monitor"), "mode": node.get("mode", "min")}
    if not node.get("metric"):
        return None
    return Monitor(str(node["metric"]), check_mode(node.get("mode")))
