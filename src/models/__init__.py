"""Encoders/decoders, losses and the tokenizer LightningModules.

`load_tokenizer(ckpt_path, map_location="cpu")` (src/models/load.py) is importable from here;
it is imported on first use, so `import src.models` stays light.
"""

from typing import Any

__all__ = ["load_tokenizer"]


def __getattr__(name: str) -> Any:
    if name == "load_tokenizer":
        from src.models.load import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'src.models' has no attribute {name!r}")
