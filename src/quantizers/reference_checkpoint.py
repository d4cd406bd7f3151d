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
A reference ResidualFSQ (alone or in a GroupedResidualFSQ) holds only its projections, which
would load into our default `refinement="exact"` ResidualFSQ and then give other outputs
silently: when the state dict's metadata shows another module tree (the reference's `layers`
list, no `stack`), loading it there raises, naming `refinement="rescaled"`, the reference's
algorithm (`guard_exact_residual_fsq`; a grouped one only when loaded at the top level).

Dispatch is by class name (this file imports no quantizer, so the quantizers can import it).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import MutableMapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "convert_reference_state_dict",
    "guard_exact_residual_fsq",
    "load_reference_state_dict",
    "reference_keys_hook",
]

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
    for group, member in enumerate(getattr(module, "members", ())):
        _refuse_exact_residual_fsq(member, sd, f"{prefix}rvqs.{group}.")
    _rename_prefix(sd, f"{prefix}rvqs.", f"{prefix}members.")


def _refuse_exact_residual_fsq(
    module: nn.Module, sd: MutableMapping[str, Any], source_prefix: str
) -> None:
    """Raise if `sd` holds the reference's ResidualFSQ under `source_prefix` (its `layers`
    module list in the metadata `state_dict()` records) and `module` is our exact-refinement
    ResidualFSQ: only the projections would load, and the outputs would differ silently."""
    if "ResidualFSQ" not in _class_names(module) or module.refinement != "exact":
        return
    metadata = getattr(sd, "_metadata", None)
    if metadata is not None and f"{source_prefix}layers" in metadata:
        raise _exact_residual_fsq_error(source_prefix)


def _exact_residual_fsq_error(prefix: str) -> ValueError:
    where = f"under {prefix!r}" if prefix else "at the top level"
    return ValueError(
        f"the state dict {where} was saved from another module "
        f"tree than this ResidualFSQ's (no `stack`), such as the reference library's "
        f"ResidualFSQ, whose algorithm is ResidualFSQ(refinement='rescaled'); this module "
        f"uses refinement='exact' (the default), so it would load and then give other "
        f"outputs. Build it with refinement='rescaled' (bound_hard_clamp then defaults to the "
        f"reference's True), or load dict(state_dict) (no metadata) to take only the "
        f"projections on purpose"
    )


def guard_exact_residual_fsq(module: nn.Module) -> None:
    """Make `load_state_dict` of our exact-refinement ResidualFSQ `module` raise on a
    reference ResidualFSQ's state dict, also where `module` sits inside a larger model (whose
    submodules' load hooks see only their own metadata entry): the dict has the entry
    `state_dict()` records for `module` (so metadata came along) but none for its `stack`,
    which every ResidualFSQ of ours has had."""
    module._register_load_state_dict_pre_hook(_note_metadata, with_module=True)
    module.stack._register_load_state_dict_pre_hook(partial(_check_stack_metadata, module))


def _note_metadata(
    module: nn.Module, sd: Any, prefix: str, local_metadata: dict, *args: Any
) -> None:
    module._loading_with_metadata = "version" in local_metadata


def _check_stack_metadata(
    owner: nn.Module, sd: Any, prefix: str, local_metadata: dict, *args: Any
) -> None:
    if getattr(owner, "_loading_with_metadata", False) and "version" not in local_metadata:
        raise _exact_residual_fsq_error(prefix.removesuffix("stack."))


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
    """A copy of `state_dict` (from the reference class matching `module`) in our layout,
    keeping its metadata (module versions, and the checks above)."""
    converted = OrderedDict(state_dict)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        converted._metadata = metadata  # type: ignore[attr-defined]
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
