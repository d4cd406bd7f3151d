"""Load state dicts saved from the reference library (vector-quantize-pytorch) into our modules.

The reference stores a VectorQuantize's codebook under `_codebook.` with a leading codebook
axis even when there is one codebook, a residual quantizer's layers under `layers.<i>.`
(each depth repeated when the codebook is shared), grouped quantizers under `rvqs.<g>.`,
LFQ's constant bit mask as a buffer and LatentQuantize's values as one parameter per latent
dimension. `convert_reference_state_dict(module, state_dict)` rewrites such a dict into the
keys and shapes of `module` (keys already in our layout pass unchanged, so it is idempotent);
VectorQuantize, every residual family and every grouped family run it as a load pre-hook, so
`module.load_state_dict(reference.state_dict())` just works for them. For LFQ / FSQ /
LatentQuantize / SimVQ used on their own, call `load_reference_state_dict(module, sd)`.
ResidualVQ's implicit neural codebooks keep the reference's names (`mlps.<i>.`) and a codebook
size per depth needs no rewrite (each `layers.<i>.` has its own shape), so both load as is.

Dispatch is by class name (this file imports no quantizer, so the quantizers can import it).
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["convert_reference_state_dict", "load_reference_state_dict", "reference_keys_hook"]

_CODEBOOK_BUFFERS = ("embed", "embed_avg", "cluster_size", "initted")


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _rename_prefix(sd: MutableMapping[str, Any], old: str, new: str) -> None:
    for key in [k for k in sd if k.startswith(old)]:
        sd[new + key[len(old) :]] = sd.pop(key)


def _convert_vq(module: nn.Module, sd: MutableMapping[str, Any], prefix: str) -> None:
    """`_codebook.<buffer>` -> `<buffer>`, dropping the reference's singleton codebook axis;
    `project_in.0.` (the reference's Sequential) -> `project_in.` / `project_in_norm.`;
    `_codebook.vq_bridge.` -> `vq_bridge.`; the affine batch moments' init flags."""
    from_reference = any(key.startswith(f"{prefix}_codebook.") for key in sd)
    _rename_prefix(sd, f"{prefix}_codebook.vq_bridge.", f"{prefix}vq_bridge.")
    for name in _CODEBOOK_BUFFERS:
        key = f"{prefix}_codebook.{name}"
        if key not in sd:
            continue
        value = sd.pop(key)
        ours = getattr(module, name, None)
        singleton_axis = isinstance(value, Tensor) and isinstance(ours, Tensor)
        if singleton_axis and value.ndim == ours.ndim + 1 and value.shape[0] == 1:
            value = value[0]
        sd[f"{prefix}{name}"] = value
    # affine-parameter statistics live in our `affine.` submodule (when it exists)
    for name in ("batch_mean", "batch_variance", "codebook_mean", "codebook_variance"):
        for suffix in ("", "_needs_init"):
            key = f"{prefix}_codebook.{name}{suffix}"
            if key in sd:
                sd[f"{prefix}affine.{name}{suffix}"] = sd.pop(key)
    affine = getattr(module, "affine", None)
    if from_reference and affine is not None:
        # the reference registers its batch moments at their first update and never gives
        # them an init flag: present means set (flag False), absent means still to be set
        for name in ("batch_mean", "batch_variance"):
            key = f"{prefix}affine.{name}"
            sd.setdefault(f"{key}_needs_init", torch.tensor(key not in sd))
            sd.setdefault(key, getattr(affine, name).detach().clone())
    if f"{prefix}project_in.0.weight" in sd:
        _rename_prefix(sd, f"{prefix}project_in.1.", f"{prefix}project_in_norm.")
        _rename_prefix(sd, f"{prefix}project_in.0.", f"{prefix}project_in.")


def _convert_residual(module: nn.Module, sd: MutableMapping[str, Any], prefix: str) -> None:
    """`layers.<i>.` -> `stack.layers.<i>.`; a shared codebook keeps only depth 0."""
    stack = getattr(module, "stack", None)
    if stack is None:
        return
    pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.(.*)")
    for key in list(sd):
        found = pattern.fullmatch(key)
        if found is None:
            continue
        value = sd.pop(key)
        depth, rest = int(found.group(1)), found.group(2)
        if stack.shared and depth > 0:
            continue  # the reference repeats the one shared codebook at every depth
        sd[f"{prefix}stack.layers.{depth}.{rest}"] = value


def _convert_grouped(module: nn.Module, sd: MutableMapping[str, Any], prefix: str) -> None:
    _rename_prefix(sd, f"{prefix}rvqs.", f"{prefix}members.")


def _convert_lfq(module: nn.Module, sd: MutableMapping[str, Any], prefix: str) -> None:
    """The reference's `mask` buffer is the constant 2 ** arange(bits): nothing to load."""
    if f"{prefix}mask" in sd and "mask" not in dict(module.named_buffers(recurse=False)):
        sd.pop(f"{prefix}mask")


def _convert_latent(module: nn.Module, sd: MutableMapping[str, Any], prefix: str) -> None:
    """`values_per_latent.<d>` (one tensor per latent dimension) -> rows of `values`."""
    keys = sorted(
        (k for k in sd if k.startswith(f"{prefix}values_per_latent.")),
        key=lambda k: int(k.rsplit(".", 1)[1]),
    )
    if not keys:
        return
    values = module.values.detach().clone()
    rows = [sd.pop(k) for k in keys]
    if len(rows) != values.shape[0]:
        raise ValueError(
            f"reference LatentQuantize has {len(rows)} latent dimensions, this module "
            f"{values.shape[0]}"
        )
    for d, row in enumerate(rows):
        values[d, : row.shape[0]] = row.to(values)
    sd[f"{prefix}values"] = values


_RULES = (
    ("VectorQuantize", _convert_vq),
    ("ResidualQuantizer", _convert_residual),
    ("GroupedResidual", _convert_grouped),
    ("LFQ", _convert_lfq),
    ("LatentQuantize", _convert_latent),
)


def _convert_in_place(module: nn.Module, sd: MutableMapping[str, Any], prefix: str) -> None:
    """Rewrite the keys under `prefix` for `module`, then for its children (top-down, as
    the parent's renames decide the children's prefixes)."""
    names = _class_names(module)
    for class_name, rule in _RULES:
        if class_name in names:
            rule(module, sd, prefix)
    for child_name, child in module.named_children():
        _convert_in_place(child, sd, f"{prefix}{child_name}.")


def convert_reference_state_dict(
    module: nn.Module, state_dict: MutableMapping[str, Any]
) -> dict[str, Any]:
    """A copy of `state_dict` (from the reference class matching `module`) in our layout."""
    converted = dict(state_dict)
    _convert_in_place(module, converted, "")
    return converted


def load_reference_state_dict(
    module: nn.Module, state_dict: MutableMapping[str, Any], strict: bool = True
) -> Any:
    """`module.load_state_dict` of a state dict saved from the reference library."""
    return module.load_state_dict(convert_reference_state_dict(module, state_dict), strict=strict)


def reference_keys_hook(
    module: nn.Module, state_dict: MutableMapping[str, Any], prefix: str, *args: Any
) -> None:
    """Load pre-hook (`module._register_load_state_dict_pre_hook(..., with_module=True)`)
    that accepts the reference library's keys for `module` and everything below it."""
    _convert_in_place(module, state_dict, prefix)


def register_reference_keys(module: nn.Module) -> None:
    """Make `module.load_state_dict` accept the reference library's keys."""
    module._register_load_state_dict_pre_hook(reference_keys_hook, with_module=True)
