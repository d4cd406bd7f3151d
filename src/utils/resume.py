"""Auto-resume: find the newest checkpoint of a run directory that loads, and check that the
current config may continue it.

A run named with `run_name` keeps its checkpoints in <run dir>/checkpoints/. Re-running the same
command resumes from the checkpoint with the highest global step that loads (a file cut short by a
kill is skipped with a warning); if checkpoints exist but none loads, resuming stops with an error
rather than silently starting again over them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from src.callbacks.config_in_checkpoint import CONFIG_KEY

log = logging.getLogger(__name__)

MISSING = "<missing>"


class ResumeError(RuntimeError):
    """The run directory cannot be resumed as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ResumePoint:
    """A loadable checkpoint and what it holds."""

    path: Path
    global_step: int
    config: dict[str, Any] | None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint's tensors lazily (mmap, weights_only): cheap, and fails on a cut file."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def newest_checkpoint(ckpt_dir: Path) -> ResumePoint | None:
    """The loadable `*.ckpt` in ``ckpt_dir`` with the highest global step (the newest file among
    equal steps); None when the directory holds no checkpoint. Raises ResumeError when it holds
    checkpoints but none loads."""
    paths = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if not paths:
        return None
    loadable: list[tuple[int, int, ResumePoint]] = []
    broken: list[str] = []
    for path in paths:
        try:
            checkpoint = read_checkpoint(path)
            step = int(checkpoint["global_step"])
        except Exception as error:  # a cut or foreign file: skip it, say so
            log.warning("skipping checkpoint %s: it does not load (%s)", path, error)
            broken.append(f"{path.name}: {type(error).__name__}: {error}")
            continue
        point = ResumePoint(path, step, checkpoint.get(CONFIG_KEY))
        loadable.append((step, path.stat().st_mtime_ns, point))
    if not loadable:
        raise ResumeError(
            f"cannot resume: none of the checkpoints in {ckpt_dir} loads:\n  "
            + "\n  ".join(broken)
            + "\nMove them away to start this run again, or pass ckpt_path=<a good checkpoint>."
        )
    return max(loadable, key=lambda item: item[:2])[2]


def config_differences(
    stored: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str]
) -> list[str]:
    """`key.sub: stored -> current` for every leaf under ``keys`` that differs."""
    differences: list[str] = []
    for key in keys:
        old = _flatten(stored.get(key, MISSING), key)
        new = _flatten(current.get(key, MISSING), key)
        for name in sorted(set(old) | set(new)):
            if old.get(name, MISSING) != new.get(name, MISSING):
                differences.append(
                    f"{name}: {old.get(name, MISSING)!r} -> {new.get(name, MISSING)!r}"
                )
    return differences


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}"))
        return flat
    return {prefix: list(value) if isinstance(value, (list, tuple)) else value}


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def resume_point(cfg: DictConfig, run_dir: Path) -> ResumePoint | None:
    """Where this run continues from: an explicit `ckpt_path`, else (with a run_name and
    `resume.auto`) the run directory's newest loadable checkpoint, else None (a fresh start).

    Either way the checkpoint's stored config must match the current one under
    `resume.must_match` (model, data, seed by default); otherwise a ResumeError lists every
    difference, before any weights are loaded (a raw state-dict size error says far less)."""
    resume = cfg.get("resume") or {}
    if cfg.get("ckpt_path"):
        point = explicit_checkpoint(Path(str(cfg.ckpt_path)))
        _check_config(point, cfg, f"cannot train from ckpt_path={point.path}")
        return point
    if cfg.get("run_name") is None or not resume.get("auto", True):
        return None
    point = newest_checkpoint(run_dir / "checkpoints")
    if point is None:
        return None
    _check_config(point, cfg, f"cannot resume run {cfg.run_name!r} from {point.path}")
    log.info("resuming run %r from %s (step %d)", cfg.run_name, point.path, point.global_step)
    return point


def explicit_checkpoint(path: Path) -> ResumePoint:
    """The checkpoint a user named with `ckpt_path`, or a ResumeError saying why it cannot."""
    try:
        checkpoint = read_checkpoint(path)
        step = int(checkpoint["global_step"])
    except Exception as error:
        raise ResumeError(
            f"ckpt_path={path} does not load ({type(error).__name__}: {error}); pass the path "
            "of a checkpoint written by train.py (e.g. <run dir>/checkpoints/last.ckpt)"
        ) from error
    return ResumePoint(path, step, checkpoint.get(CONFIG_KEY))


def _check_config(point: ResumePoint, cfg: DictConfig, what: str) -> None:
    """Raise a ResumeError listing where the stored config differs under resume.must_match."""
    if point.config is None:
        return
    keys = list((cfg.get("resume") or {}).get("must_match") or [])
    current = {key: _plain(cfg.get(key, MISSING)) for key in keys}
    differences = config_differences(point.config, current, keys)
    if differences:
        raise ResumeError(
            f"{what}: its config differs in\n  "
            + "\n  ".join(differences)
            + "\nRun with the same overrides as the checkpoint's run, pick a new run_name for a "
            f"new run, or narrow resume.must_match (now {keys}) to continue on purpose."
        )
