"""SimVQ (Zhu et al. 2024, arXiv 2411.02038): a frozen random codebook behind one linear map.

The codebook actually searched is `W(C)`, where `C` is a random codebook stored as a buffer
and never updated, and `W` is a learnable map (a bias-free linear layer by default). Every
gradient step on `W` moves all codes at once, so codes the encoder never selects are not left
behind: the paper's remedy for representation collapse. The codebook-side loss
||W(C)[k] - sg(z)||^2 is what trains `W`; the commitment loss ||z - sg(W(C)[k])||^2 trains the
encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.quantizers.contract import QuantizerContract, check_index_range
from src.quantizers.float_input import check_float_input
from src.quantizers.kernels import nearest_code, rotate_to, straight_through
from src.quantizers.registry import register_quantizer


class SimVQOutput(NamedTuple):
    """`quantized` has the input's layout; `indices` is int64; `loss` is a scalar ()."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor


def _identity(codebook: Tensor) -> Tensor:
    return codebook


@register_quantizer("simvq")
class SimVQ(nn.Module, QuantizerContract):
    """Nearest-code quantizer over the learned transform of a frozen random codebook.

    Input is channel-last `(..., dim)` (e.g. `(batch, seq, dim)`), or channel-first
    `(batch, dim, *spatial)` with `channel_first=True`. Keywords follow the reference library:
    `codebook_transform` replaces the default `nn.Linear(frozen_codebook_dim, dim, bias=False)`
    (any module mapping `(..., frozen_codebook_dim)` to `(..., dim)`), `init_fn` post-processes
    the random `(codebook_size, frozen_codebook_dim)` codebook once at construction, and
    `input_to_quantize_commit_loss_weight` weighs the encoder-side commitment term relative to
    the codebook-side term; `commitment_weight` scales their sum.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_transform: nn.Module | None = None,
        init_fn: Callable[[Tensor], Tensor] = _identity,
        channel_first: bool = False,
        rotation_trick: bool = True,
        input_to_quantize_commit_loss_weight: float = 0.25,
        commitment_weight: float = 1.0,
        frozen_codebook_dim: int | None = None,
    ) -> None:
        super().__init__()
        frozen_codebook_dim = dim if frozen_codebook_dim is None else frozen_codebook_dim
        if dim < 1 or codebook_size < 1 or frozen_codebook_dim < 1:
            raise ValueError(
                f"dim, codebook_size and frozen_codebook_dim must be positive, got {dim}, "
                f"{codebook_size}, {frozen_codebook_dim}"
            )
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_codebooks = 1
        self.frozen_codebook_dim = frozen_codebook_dim
        self.channel_first = channel_first
        self.rotation_trick = rotation_trick
        self.input_to_quantize_commit_loss_weight = input_to_quantize_commit_loss_weight
        self.commitment_weight = commitment_weight

        # unit-variance rows after the map: entries ~ N(0, 1/frozen_codebook_dim)
        frozen = torch.randn(codebook_size, frozen_codebook_dim) * frozen_codebook_dim**-0.5
        frozen = init_fn(frozen)
        if tuple(frozen.shape) != (codebook_size, frozen_codebook_dim):
            raise ValueError(
                f"init_fn must keep the codebook's shape ({codebook_size}, "
                f"{frozen_codebook_dim}), got {tuple(frozen.shape)}"
            )
        self.register_buffer("frozen_codebook", frozen.float())
        if codebook_transform is None:
            codebook_transform = nn.Linear(frozen_codebook_dim, dim, bias=False)
        self.code_transform = codebook_transform

    @property
    def codebook(self) -> Tensor:
        """The (codebook_size, dim) float32 codebook searched: the transformed frozen codes."""
        with torch.autocast(self.frozen_codebook.device.type, enabled=False):
            return self.code_transform(self.frozen_codebook).float()

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Decode int indices (...) into the forward output (..., dim) in the input layout."""
        check_index_range(indices, self.codebook_size, self)
        codes = F.embedding(indices.long(), self.codebook)
        return codes.movedim(-1, 1) if self.channel_first else codes

    get_output_from_indices = indices_to_codes
    decode_indices = indices_to_codes  # the contract's name

    def forward(self, x: Tensor) -> SimVQOutput:
        """Quantize `x`; the loss is always computed (its gradient trains the map)."""
        check_float_input(x, "SimVQ")
        self._check_input(x)
        if self.channel_first:
            x = x.movedim(1, -1)
        index_shape = x.shape[:-1]
        latents = x.reshape(-1, self.dim).float()

        codebook = self.codebook
        indices = nearest_code(latents.detach(), codebook.detach())
        codes = F.embedding(indices, codebook)

        with torch.autocast(latents.device.type, enabled=False):
            codebook_loss = F.mse_loss(codes, latents.detach())
            commit_loss = F.mse_loss(latents, codes.detach())
        loss = self.commitment_weight * (
            codebook_loss + self.input_to_quantize_commit_loss_weight * commit_loss
        )

        estimator = rotate_to if self.rotation_trick else straight_through
        out = estimator(latents, codes.detach()).to(x.dtype).reshape(*index_shape, self.dim)
        if self.channel_first:
            out = out.movedim(-1, 1)
        return SimVQOutput(out, indices.reshape(index_shape), loss)

    def _check_input(self, x: Tensor) -> None:
        if self.channel_first:
            if x.ndim < 3 or x.shape[1] != self.dim:
                raise ValueError(
                    f"SimVQ(channel_first=True) expects (batch, dim={self.dim}, ...) input; "
                    f"got {tuple(x.shape)}"
                )
        elif x.ndim < 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"SimVQ expects channel-last (batch, ..., dim={self.dim}) input, e.g. "
                f"(batch, seq, dim); got {tuple(x.shape)}; build with channel_first=True for "
                f"(batch, dim, height, width) maps"
            )
