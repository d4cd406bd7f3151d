"""The shell every residual quantizer family shares around its `ResidualStack`.

ResidualVQ, ResidualFSQ, ResidualLFQ and ResidualSimVQ differ only in the layers they stack
and in how their forward prepares the layers' input (FSQ bounds it, LFQ runs it in float32,
VQ passes masks); the rest is here, once: the input/output projections, the quantize-dropout
keywords and the kept-depth draw, the index checks and the decode paths
(`get_codes_from_indices`, `decode_indices` and its reference alias
`get_output_from_indices`). Construction order is the family's own (projections before or
after the layers), so seeded initialisations stay as they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from src.quantizers.communicator import Communicator, Distributable
from src.quantizers.contract import QuantizerContract
from src.quantizers.float_input import check_float_input, like_input, project
from src.quantizers.reference_checkpoint import register_reference_keys
from src.quantizers.residual import (
    CodebookTransforms,
    DeferUpdates,
    ResidualStack,
    share_communicator,
)


class ResidualQuantizer(Distributable, QuantizerContract):
    """Base of the residual families. Subclasses call `init_projections` and `init_stack`
    (in their own order), set `channel_first`, and implement `forward`."""

    channel_first: bool = False  # whether inputs and decoded outputs are (batch, dim, ...)

    def init_projections(self, dim: int, codebook_dim: int) -> None:
        """Linear maps between the input width and the layers' width (identity when equal)."""
        self.dim = dim
        self.codebook_dim = codebook_dim
        projected = dim != codebook_dim
        self.project_in: nn.Module = nn.Linear(dim, codebook_dim) if projected else nn.Identity()
        self.project_out: nn.Module = nn.Linear(codebook_dim, dim) if projected else nn.Identity()

    def init_stack(
        self,
        layers: Sequence[nn.Module],
        *,
        quantize_dropout: bool,
        quantize_dropout_cutoff_index: int,
        quantize_dropout_multiple_of: int,
        decode: str,
        depth: int | None = None,
        defer_updates: DeferUpdates | None = None,
    ) -> None:
        """The residual stack over `layers` (one shared layer repeated `depth` times when
        `depth` is given) with the quantize-dropout settings; sets the contract's sizes."""
        self.stack = ResidualStack(
            layers,
            depth=depth,
            quantize_dropout=quantize_dropout,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
            decode=decode,
            defer_updates=defer_updates,
            owner=type(self).__name__,
        )
        self.num_quantizers = self.stack.depth
        self.num_codebooks = self.stack.depth
        self.depth_codebook_sizes = tuple(
            int(self.stack.layer(i).codebook_size) for i in range(self.stack.depth)
        )
        # the largest when the depths differ (ResidualVQ(codebook_size=(5, 128, 256)));
        # `codebook_sizes` has each depth's
        self.codebook_size: int = max(self.depth_codebook_sizes)
        register_reference_keys(self)  # load_state_dict takes the reference library's keys

    @property
    def codebook_sizes(self) -> tuple[int, ...]:  # type: ignore[override]
        """The codebook size of each depth (the contract's per-slot sizes)."""
        return self.depth_codebook_sizes

    def codebook_transforms(self) -> CodebookTransforms | None:
        """Per-depth codebook transforms (implicit neural codebooks); None: stored codebooks."""
        return None

    def set_communicator(self, communicator: Communicator) -> None:
        """Hand the communicator to the stack and its layers too."""
        share_communicator(self, communicator)

    def project_latents(self, x: Tensor) -> Tensor:
        """`project_in(x)` under the shared input rules (src/quantizers/float_input.py):
        integer input is refused naming this class; fp16 / bf16 latents outside autocast run
        in the projection's dtype instead of failing in its matmul."""
        check_float_input(x, type(self).__name__)
        return project(self.project_in, x)

    def project_codes(self, codes: Tensor, x: Tensor) -> Tensor:
        """`project_out(codes)`, returned in the input `x`'s dtype outside autocast."""
        return like_input(project(self.project_out, codes), x)

    @property
    def layers(self) -> nn.ModuleList | list[nn.Module]:
        """The layer used at each depth (one object repeated when the codebook is shared)."""
        if self.stack.shared:
            return [self.stack.layer(i) for i in range(self.num_quantizers)]
        return self.stack.layers

    def draw_num_kept(
        self, device: torch.device | str = "cpu", seed: int | None = None
    ) -> int | None:
        """Quantize-dropout depth for this training step, agreed across ranks (None: all);
        `seed` fixes it as the reference's `rand_quantize_dropout_fixed_seed` does."""
        return self.stack.draw_num_kept(device, seed)

    # ---- decode -----------------------------------------------------------------------------

    def from_stack_units(self, codes: Tensor) -> Tensor:
        """The stack's layer outputs in the units `project_out` takes (identity by default)."""
        return codes

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Per-layer codes (num_quantizers, *indices.shape[:-1], codebook_dim) before
        `project_out`; -1 (a dropped layer) and missing trailing layers give zeros."""
        self.check_indices(indices)
        codes = self.stack.get_codes_from_indices(indices, self.codebook_transforms())
        return self.from_stack_units(codes)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Decode indices (..., q <= num_quantizers) into the eval forward's output, in the
        input layout (the contract's decode)."""
        self.check_indices(indices)
        transforms = self.codebook_transforms()
        summed = self.from_stack_units(self.stack.get_output_from_indices(indices, transforms))
        out = self.project_out(summed.to(self.project_dtype()))
        return out.movedim(-1, 1) if self.channel_first else out

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The reference's name of `decode_indices`."""
        return self.decode_indices(indices)

    def check_indices(self, indices: Tensor) -> None:
        if indices.ndim < 2 or not 1 <= indices.shape[-1] <= self.num_quantizers:
            raise ValueError(
                f"{type(self).__name__} indices must be (batch, ..., q) with 1 <= q <= "
                f"{self.num_quantizers}; got {tuple(indices.shape)}"
            )

    def project_dtype(self) -> torch.dtype:
        weight = getattr(self.project_out, "weight", None)
        return weight.dtype if weight is not None else torch.float32
