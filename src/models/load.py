"""`load_tokenizer(ckpt_path)`: a trained tokenizer from its checkpoint alone, no Hydra run.

A checkpoint written by train.py holds the run's resolved config (`vqzoo_config`, see
src/callbacks/config_in_checkpoint.py) and the keywords the model was built with
(`hyper_parameters`, Lightning's `save_hyperparameters`). The model class comes from the
config's `model._target_`, the keywords from `hyper_parameters` (they already hold what the
datamodule filled in, e.g. `in_channels`), the weights from `state_dict`. Loaded with
`weights_only=True`: nothing in the file is executed.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import torch

from src.callbacks.config_in_checkpoint import CONFIG_KEY
from src.models.codes_api import CodesAPI


class NotATokenizerError(ValueError):
    """The file is not a checkpoint of a vqzoo tokenizer."""


def load_tokenizer(
    ckpt_path: str | Path, map_location: str | torch.device | None = "cpu"
) -> CodesAPI:
    """The image or audio tokenizer stored in `ckpt_path`, in eval mode on `map_location`.

    Raises FileNotFoundError for a missing file and NotATokenizerError (a ValueError) for a
    file that is not a torch checkpoint, has no vqzoo run config, or holds another kind of
    model.
    """
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path}")
    checkpoint = read_checkpoint(path)
    cls = tokenizer_class(checkpoint, path)
    model = cls(**build_kwargs(checkpoint, path))
    model.load_state_dict(checkpoint["state_dict"])
    if isinstance(map_location, str | torch.device):
        model = model.to(torch.device(map_location))
    return model.eval()


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict (CPU tensors), or NotATokenizerError saying why it is not one."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise NotATokenizerError(
            f"{path} is not a readable torch checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); pass a .ckpt written by "
            "vqzoo's train.py"
        ) from None
    if not isinstance(checkpoint, dict) or CONFIG_KEY not in checkpoint:
        raise NotATokenizerError(
            f"{path} holds no vqzoo run config (key {CONFIG_KEY!r}): it was not written by "
            "vqzoo's train.py; pass a tokenizer checkpoint such as <run>/checkpoints/last.ckpt"
        )
    if "state_dict" not in checkpoint:
        raise NotATokenizerError(f"{path} has a run config but no model weights (state_dict)")
    return checkpoint


def tokenizer_class(checkpoint: dict[str, Any], path: Path) -> type[CodesAPI]:
    """The model class named by the stored config; NotATokenizerError unless it is one with
    the codes API (ImageTokenizer, AudioTokenizer)."""
    model_cfg = checkpoint[CONFIG_KEY].get("model") or {}
    target = model_cfg.get("_target_") if isinstance(model_cfg, dict) else None
    if not isinstance(target, str) or "." not in target:
        raise NotATokenizerError(f"{path}: the stored run config names no model._target_")
    module_name, _, class_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise NotATokenizerError(
            f"{path}: cannot import its model class {target}: {error}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, CodesAPI)):
        raise NotATokenizerError(
            f"{path} holds a {target} model, not a tokenizer: load_tokenizer needs the "
            "checkpoint of a model with the codes API (ImageTokenizer, AudioTokenizer)"
        )
    return cls


def build_kwargs(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """Constructor keywords: `hyper_parameters`, else the stored model config with the nulls
    the datamodule fills in (image channels, sample rate) taken from the stored data config."""
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict) and hparams:
        return dict(hparams)
    import hydra
    from omegaconf import OmegaConf

    from src.utils.config_checks import model_overrides

    run_cfg = OmegaConf.create(checkpoint[CONFIG_KEY])
    datamodule = hydra.utils.instantiate(run_cfg.data)
    kwargs = OmegaConf.to_container(run_cfg.model, resolve=True)
    kwargs.pop("_target_")
    kwargs.update(model_overrides(run_cfg, datamodule))
    return kwargs
