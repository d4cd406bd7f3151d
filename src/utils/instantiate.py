"""Build callbacks and loggers from their config groups (each entry one `_target_`)."""

from __future__ import annotations

import logging

import hydra
from lightning import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _instantiate_group(group: DictConfig | None, kind: str) -> list:
    if not group:
        return []
    if not isinstance(group, DictConfig):
        raise TypeError(f"the {kind} config must be a mapping of name -> {{_target_: ...}}")
    built = []
    for name, entry in group.items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            log.info("instantiating %s %s <%s>", kind, name, entry._target_)
            built.append(hydra.utils.instantiate(entry))
    return built


def instantiate_callbacks(config: DictConfig | None) -> list[Callback]:
    return _instantiate_group(config, "callback")


def instantiate_loggers(config: DictConfig | None) -> list[Logger]:
    return _instantiate_group(config, "logger")
