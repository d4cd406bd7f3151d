"""Quantizers registered by name, so configs and the command line pick one with `quantizer=NAME`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

ModuleType = TypeVar("ModuleType", bound=type[nn.Module])

_REGISTRY: dict[str, type[nn.Module]] = {}


class UnknownQuantizerError(KeyError):
    """Raised for a quantizer name nobody registered; the message lists the ones that exist."""

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0])


def register_quantizer(name: str) -> Callable[[ModuleType], ModuleType]:
    """Class decorator: make `cls` buildable as `build_quantizer(name, ...)`."""

    def decorator(cls: ModuleType) -> ModuleType:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"quantizer name {name!r} is already taken by {_REGISTRY[name]!r}")
        _REGISTRY[name] = cls
        return cls

    return decorator


def registered_quantizers() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def quantizer_class(name: str) -> type[nn.Module]:
    """The class registered under `name`, or a clear error listing the registered names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(registered_quantizers())
        raise UnknownQuantizerError(
            f"unknown quantizer {name!r}; registered quantizers are: {known}. "
            f"Pick one with `quantizer=<name>` (one config per name in configs/quantizer/)."
        ) from None


def build_quantizer(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the quantizer registered under `name` with the reference API's keywords."""
    return quantizer_class(name)(**kwargs)
