"""Random-projection quantizer (BEST-RQ, Chiu et al. 2022; multi-codebook as in USM).

Targets for masked prediction, not a bottleneck: tokens are standardised, projected by a
frozen random matrix and matched (cosine similarity) to a frozen random codebook, one
projection and codebook per codebook head. Nothing here is learned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from src.quantizers.communicator import Distributable
from src.quantizers.contract import QuantizerContract
from src.quantizers.float_input import check_float_input
from src.quantizers.kernels import l2_normalize, nearest_code
from src.quantizers.registry import register_quantizer


@register_quantizer("rpq")
class RandomProjectionQuantizer(Distributable, QuantizerContract):
    """`(batch, seq, dim)` -> int64 indices `(batch, seq, num_codebooks)`.

    `norm=True` standardises every token over its features (zero mean, unit variance, no
    affine), as the BEST-RQ paper does to keep the random projections from collapsing.
    Projections are Xavier-normal `(num_codebooks, dim, codebook_dim)`; codes are unit
    vectors. Both are buffers (saved, never trained); under several ranks rank 0's copy is
    broadcast on the first call so every rank produces the same targets.
    """

    produces_quantized = False  # indices only: it cannot sit between an encoder and a decoder

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        codebook_dim: int,
        num_codebooks: int = 1,
        norm: bool = True,
    ) -> None:
        super().__init__()
        if min(dim, codebook_size, codebook_dim, num_codebooks) < 1:
            raise ValueError(
                "dim, codebook_size, codebook_dim and num_codebooks must be positive, got "
                f"{dim}, {codebook_size}, {codebook_dim}, {num_codebooks}"
            )
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks
        self.norm = norm
        std = math.sqrt(2.0 / (dim + codebook_dim))  # Xavier normal for a dim -> codebook_dim map
        self.register_buffer("rand_projs", torch.randn(num_codebooks, dim, codebook_dim) * std)
        codes = l2_normalize(torch.randn(num_codebooks, codebook_size, codebook_dim))
        self.register_buffer("codebook", codes)
        self._synced = False

    def _sync(self) -> None:
        """Make every rank use rank 0's projections and codes (once; all ranks call it)."""
        comm = self.communicator
        if comm.world_size > 1 and not self._synced:
            self.rand_projs.copy_(comm.broadcast(self.rand_projs, src=0))
            self.codebook.copy_(comm.broadcast(self.codebook, src=0))
        self._synced = True

    def set_communicator(self, communicator: object) -> None:
        super().set_communicator(communicator)
        self._synced = False

    def project(self, x: Tensor) -> Tensor:
        """Unit-length projections (batch, seq, num_codebooks, codebook_dim), float32."""
        check_float_input(x, "RandomProjectionQuantizer")
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"RandomProjectionQuantizer expects (batch, seq, dim={self.dim}) input, "
                f"got shape {tuple(x.shape)}"
            )
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.norm:
                x = F.layer_norm(x, (self.dim,))
            projected = torch.einsum("bnd,hde->bnhe", x, self.rand_projs.float())
            return l2_normalize(projected)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Not available: the contract's decode reproduces a quantized output, and this
        quantizer has none (its indices are targets for masked prediction)."""
        raise TypeError(
            "RandomProjectionQuantizer produces indices only (targets for masked prediction); "
            "there is no quantized output to decode them to"
        )

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Indices of the nearest code (cosine) per codebook, (batch, seq, num_codebooks)."""
        self._sync()
        projected = self.project(x)
        batch, seq = projected.shape[:2]
        flat = projected.reshape(batch * seq, self.num_codebooks, self.codebook_dim)
        indices = [
            nearest_code(flat[:, h], self.codebook[h], use_cosine_sim=True)
            for h in range(self.num_codebooks)
        ]
        return torch.stack(indices, dim=-1).reshape(batch, seq, self.num_codebooks)
