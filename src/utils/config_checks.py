"""Checks that fail fast, before anything trains, with a message that says how to fix it."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig

from src.quantizers import quantizer_class
from src.utils.monitor import monitor_of


def model_takes_quantizer(config: DictConfig) -> bool:
    """Whether the configured model class has a `quantizer` argument (the tokenizers do; a prior
    on their codes does not), read from its `_target_` without building it."""
    model = config.get("model") or {}
    target = model.get("_target_")
    if not target:
        return "quantizer" in model
    try:
        parameters = inspect.signature(get_class(target)).parameters
    except (ImportError, ValueError, TypeError) as error:
        raise ValueError(f"model._target_={target!r} does not name a class: {error}") from None
    return "quantizer" in parameters


def check_quantizer_config(config: DictConfig) -> None:
    """A model that takes a quantizer must name a registered one (raises
    UnknownQuantizerError); models without a quantizer are not checked."""
    if not model_takes_quantizer(config):
        return
    quantizer = config.get("model", {}).get("quantizer")
    if quantizer is None:
        raise ValueError("config has no model.quantizer; pick one with `quantizer=<name>`")
    quantizer_class(quantizer.get("name"))


def check_optimizer_config(config: DictConfig) -> None:
    """The optimizer settings a model config carries must make sense before anything is built
    (AdamW would refuse a negative learning rate only once training has been set up)."""
    model = config.get("model") or {}
    rules = {
        "lr": (lambda v: v > 0, "a positive number, e.g. model.lr=2e-3"),
        "weight_decay": (lambda v: v >= 0, ">= 0"),
        "warmup_steps": (lambda v: v >= 0, ">= 0 steps"),
        "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    }
    for key, (ok, expected) in rules.items():
        value = model.get(key)
        if value is None:
            continue
        try:
            number = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not ok(number):
            raise ValueError(f"model.{key}={value!r} is not valid: it must be {expected}")


def check_monitor(config: Mapping[str, Any], model: object) -> None:
    """The monitored metric must be one the model logs at validation (when the model says what
    it logs, `epoch_metric_names`), so a checkpoint is never chosen by a metric nobody writes;
    optimized_metric is checked the same way. Metrics outside val/ and test/ (e.g. written by a
    callback) are not checked."""
    monitor = monitor_of(config)
    if monitor is None:
        return
    names_of = getattr(model, "epoch_metric_names", None)
    if not callable(names_of):
        return
    logged = {stage: set(names_of(stage)) for stage in ("val", "test")}
    if monitor.metric.startswith("test/"):
        raise ValueError(
            f"monitor.metric={monitor.metric} is a test metric, but the best checkpoint is chosen "
            "during training: monitor a validation metric (val/...)"
        )
    wanted = {"monitor.metric": (monitor.metric, logged["val"])}
    if config.get("optimized_metric"):
        optimized = str(config["optimized_metric"])
        wanted["optimized_metric"] = (optimized, logged["val"] | logged["test"])
    for key, (name, names) in wanted.items():
        if name.startswith(("val/", "test/")) and name not in names:
            shown = ", ".join(sorted(logged["val"]))
            raise ValueError(
                f"{key}={name} is not logged by {type(model).__name__}; its validation metrics "
                f"are: {shown}. The model config sets `monitor` for its kind of model "
                "(configs/model/*.yaml); pick one of these, e.g. monitor.metric=<name> "
                "monitor.mode=<max|min>."
            )


def model_overrides(config: DictConfig, datamodule: object) -> dict[str, object]:
    """Model keywords left null in config that the datamodule knows: image channels, audio
    sample rate, and for any kind of model whatever `datamodule.model_keywords()` returns (e.g.
    a codes datamodule's codebook sizes and grid for a prior)."""
    overrides: dict[str, object] = {}
    model_keywords = getattr(datamodule, "model_keywords", None)
    if callable(model_keywords):
        for key, value in dict(model_keywords()).items():
            if key in config.model and config.model[key] is None:
                overrides[key] = value
    if "in_channels" in config.model and config.model.in_channels is None:
        overrides["in_channels"] = datamodule.num_channels
    if "sample_rate" in config.model and config.model.sample_rate is None:
        if not hasattr(datamodule, "sample_rate"):
            raise ValueError(
                f"model.sample_rate is null and {type(datamodule).__name__} has no sample_rate: "
                "the audio tokenizer needs an audio datamodule (e.g. data=allison_speech)"
            )
        overrides["sample_rate"] = datamodule.sample_rate
    return overrides
