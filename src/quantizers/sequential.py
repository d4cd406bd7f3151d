"""`Sequential`: modules around exactly one quantizer, returning the quantizer's tuple.

The reference library's helper: `Sequential(proj_in, quantizer, proj_out)(x, **kwargs)` runs
the modules in order, passes `kwargs` to the quantizer only, and returns
`(final output, *the quantizer's other outputs)`, e.g. `(x, indices, loss)`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from src.quantizers.registry import quantizer_class, registered_quantizers


def is_quantizer(module: nn.Module) -> bool:
    """Whether `module` is an instance of a registered quantizer class."""
    classes = tuple(quantizer_class(name) for name in registered_quantizers())
    return isinstance(module, classes)


class Sequential(nn.Module):
    """Modules in order around exactly one quantizer (see the module docstring)."""

    def __init__(self, *fns: nn.Module) -> None:
        super().__init__()
        count = sum(is_quantizer(fn) for fn in fns)
        if count != 1:
            raise ValueError(
                f"Sequential must contain exactly one quantizer (a registered quantizer "
                f"class); got {count} among {[type(fn).__name__ for fn in fns]}"
            )
        self.fns = nn.ModuleList(fns)

    def forward(self, x: Tensor, **kwargs: Any) -> tuple[Any, ...]:
        rest: tuple[Any, ...] = ()
        for fn in self.fns:
            if is_quantizer(fn):
                x, *others = fn(x, **kwargs)
                rest = tuple(others)
            else:
                x = fn(x)
        return (x, *rest)
