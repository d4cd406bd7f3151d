"""Checks that fail fast, before anything trains, with a message that says how to fix it."""

from __future__ import annotations

from omegaconf import DictConfig

from src.quantizers import quantizer_class


def check_quantizer_config(config: DictConfig) -> None:
    """The model's quantizer must name a registered quantizer (raises UnknownQuantizerError)."""
    quantizer = config.get("model", {}).get("quantizer")
    if quantizer is None:
        raise ValueError("config has no model.quantizer; pick one with `quantizer=<name>`")
    quantizer_class(quantizer.get("name"))


def model_overrides(config: DictConfig, datamodule: object) -> dict[str, object]:
    """Model keywords left null in config that the datamodule knows (image channels, audio
    sample rate)."""
    overrides: dict[str, object] = {}
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
