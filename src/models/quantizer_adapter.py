"""Runs any registered quantizer over a channel-first latent map and normalises its output."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from src.quantizers import aux_loss as quantizer_aux_loss
from src.quantizers import build_quantizer, quantizer_class, registered_quantizers


class QuantizedLatents(NamedTuple):
    """What the tokenizers need from a quantizer, whatever its family."""

    latents: Tensor  # (B, C, *spatial), same layout as the encoder output
    indices: Tensor | None  # (B * tokens, num_codebooks), -1 where a code was dropped or masked
    aux_loss: Tensor  # scalar sum of the quantizer's losses (0 when it has none)
    # tokens with a NaN or inf the quantizer left out of its statistics (int64 scalar, on device)
    nonfinite_tokens: Tensor | None = None


def build_latent_quantizer(config: dict[str, Any], latent_dim: int) -> nn.Module:
    """Build the quantizer named in `config["name"]`; `dim` defaults to the latent width, and a
    `dim` set to another width is refused here, naming both, not at the first forward."""
    kwargs = dict(config)
    name = kwargs.pop("name", None)
    if name is None:
        raise ValueError("quantizer config needs a `name` key, e.g. `name: fsq`")
    if not produces_quantized(name):
        raise ValueError(
            f"{name} produces only indices (targets for masked prediction); it cannot sit "
            "between encoder and decoder; pick one of: " + ", ".join(bottleneck_quantizers())
        )
    if kwargs.get("dim") is None:
        kwargs["dim"] = latent_dim
    elif int(kwargs["dim"]) != latent_dim:
        raise ValueError(
            f"quantizer.dim={kwargs['dim']} differs from the model's latent width "
            f"model.latent_dim={latent_dim}: the quantizer sees latent_dim channels per token. "
            f"Drop quantizer.dim (it defaults to the latent width) or set "
            f"model.latent_dim={kwargs['dim']}"
        )
    return build_quantizer(name, **kwargs)


def produces_quantized(name: str) -> bool:
    """Whether the quantizer returns quantized latents (a bottleneck), not only indices."""
    return bool(getattr(quantizer_class(name), "produces_quantized", True))


def bottleneck_quantizers() -> list[str]:
    """Registered names that can sit between an encoder and a decoder."""
    return [name for name in registered_quantizers() if produces_quantized(name)]


def tokens_by_codebook(indices: Tensor, batch: int, tokens: int) -> Tensor:
    """Reshape quantizer indices to (batch * tokens, codebooks).

    Accepts (B, N), (B, N, Q) and grouped layouts (G, B, N, Q) that put the group first.
    """
    if indices.shape[:2] == (batch, tokens):
        return indices.reshape(batch * tokens, -1)
    if indices.ndim >= 3 and indices.shape[1:3] == (batch, tokens):
        return rearrange(indices, "g b n ... -> (b n) (g ...)")
    raise ValueError(
        f"cannot read quantizer indices of shape {tuple(indices.shape)} for {batch} x {tokens} "
        "tokens; expected (batch, tokens[, codebooks]) or (groups, batch, tokens[, codebooks])"
    )


def quantize_latent_map(quantizer: nn.Module, latents: Tensor) -> QuantizedLatents:
    """Quantize a (B, C, *spatial) map as a (B, tokens, C) sequence and restore its layout."""
    batch, _, *spatial = latents.shape
    sequence = rearrange(latents, "b c ... -> b (...) c")
    output = quantizer(sequence)
    quantized = output.quantized.reshape(batch, *spatial, -1)
    quantized = torch.movedim(quantized, -1, 1)
    raw_indices = getattr(output, "indices", None)
    indices = None
    if raw_indices is not None:
        indices = tokens_by_codebook(raw_indices, batch, sequence.shape[1])
    aux_loss = quantizer_aux_loss(output)  # the contract's one reading of the losses
    nonfinite = (~torch.isfinite(sequence.detach()).all(dim=-1)).sum()
    return QuantizedLatents(quantized, indices, aux_loss, nonfinite)
