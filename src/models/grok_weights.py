"""Grok-1 checkpoint naming <-> our parameters (../shared/spec/grok1.md, "Checkpoint naming").

Our layout differs in two places only: each layer's experts are stacked in two tensors
(`w_in[e]` = `linear` over `linear_v`, `w_out[e]` = `linear_1`), and RMSNorm weights are the
checkpoint's `scale`. `checkpoint_targets` maps every checkpoint name to the view of our
parameter it fills, which serves loading and exporting alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from src.models.grok import GrokLM

LM_HEAD = "lm_head.weight"
_SHOWN = 20  # names listed per kind of problem in an error message


def checkpoint_targets(lm: GrokLM) -> dict[str, Tensor]:
    """Every checkpoint name the model needs -> the parameter view it is copied into."""
    targets = {
        "model.embed_tokens.weight": lm.embed_tokens.weight,
        "model.norm.scale": lm.norm.weight,
    }
    for i, layer in enumerate(lm.layers):
        pre = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            targets[f"{pre}attn.{proj}_proj.weight"] = getattr(layer.attn, f"{proj}_proj").weight
        moe = layer.moe_block
        targets[f"{pre}moe_block.gate.weight"] = moe.gate.weight
        f = moe.ffn
        for e in range(moe.num_experts):
            expert = f"{pre}moe_block.experts.{e}."
            targets[expert + "linear.weight"] = moe.w_in.data[e, :f]
            targets[expert + "linear_v.weight"] = moe.w_in.data[e, f:]
            targets[expert + "linear_1.weight"] = moe.w_out.data[e]
        for norm in ("pre_attn", "post_attn", "pre_moe", "post_moe"):
            targets[f"{pre}{norm}_norm.scale"] = getattr(layer, f"{norm}_norm").weight
    if lm.lm_head is not None:
        targets[LM_HEAD] = lm.lm_head.weight
    return targets


def _listing(kind: str, items: list[str]) -> str:
    more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{len(items)} {kind}: " + ", ".join(items[:_SHOWN]) + more


def load_checkpoint(lm: GrokLM, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
    """Copy (name, tensor) pairs in the Grok-1 naming into `lm`; return the names loaded.

    Streams (one tensor at a time, as a 600 GB checkpoint needs); after the last pair raises
    ValueError listing unknown names, missing names, shape mismatches, duplicates and a tied
    `lm_head.weight` that differs from the embedding. The names that were fine are loaded
    even then: fix the checkpoint (or the config) and load again.
    """
    targets = checkpoint_targets(lm)
    tied = lm.lm_head is None
    loaded: set[str] = set()
    unknown: list[str] = []
    mismatched: list[str] = []
    mismatched_names: set[str] = set()
    duplicates: list[str] = []
    tied_head: Tensor | None = None
    embed = targets["model.embed_tokens.weight"]
    for name, tensor in weights:
        target = embed if (tied and name == LM_HEAD) else targets.get(name)
        if target is None:
            unknown.append(name)
            continue
        if tuple(tensor.shape) != tuple(target.shape):
            mismatched.append(f"{name} {tuple(tensor.shape)} != {tuple(target.shape)}")
            mismatched_names.add(name)
            continue
        if name in loaded:
            duplicates.append(name)
            continue
        loaded.add(name)
        if tied and name == LM_HEAD:
            tied_head = tensor  # compared with the embedding once that is loaded
            continue
        with torch.no_grad():
            target.copy_(tensor)
    missing = sorted(set(targets) - loaded - mismatched_names)
    problems = []
    for kind, items in (
        ("unknown names", unknown),
        ("missing names", missing),
        ("shape mismatches (checkpoint != model)", mismatched),
        ("duplicate names", duplicates),
    ):
        if items:
            problems.append(_listing(kind, items))
    if tied_head is not None and not torch.equal(tied_head.to(embed), embed):
        problems.append(
            f"{LM_HEAD} differs from model.embed_tokens.weight although "
            "tie_word_embeddings=True; set tie_word_embeddings=False to load a separate head"
        )
    if problems:
        raise ValueError(
            "GrokLM.load_weights: the checkpoint does not match the model ("
            f"{len(loaded)} names were loaded anyway):\n  " + "\n  ".join(problems)
        )
    return loaded


def checkpoint_weights(lm: GrokLM) -> Iterator[tuple[str, Tensor]]:
    """The model's parameters in the Grok-1 naming (views; tied head omitted)."""
    yield from checkpoint_targets(lm).items()
