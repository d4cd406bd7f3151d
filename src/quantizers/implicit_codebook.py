"""Implicit neural codebooks (QINCo, Huijben et al. 2024, arXiv 2401.14732).

In a residual VQ with implicit neural codebooks, every depth after the first searches a
codebook made for each token: its stored codes passed through a small MLP conditioned on the
sum of the codes the token got at the earlier depths. `CodebookMLP` is that network, with the
reference library's layout (so its `mlps.<i>.` parameters load unchanged): `proj_in` maps the
concatenation [condition, code] (2·dim) to dim, then `depth` residual blocks
Linear(dim, hidden) -> SiLU -> Linear(hidden, dim), and an optional L2 normalisation.

It always computes in float32 with autocast off, so the codebook a token searches under
bf16 autocast is the one `decode_indices` rebuilds outside it (decode equals forward
exactly), and distances are never taken between reduced-precision codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CodebookMLP(nn.Module):
    """Per-token codebook generator: codes (C, K, d) or (K, d), condition (..., d) ->
    (C, ..., K, d) (no leading C for a (K, d) codebook)."""

    def __init__(
        self,
        dim: int,
        dim_hidden: int | None = None,
        depth: int = 4,
        l2norm_output: bool = False,
    ) -> None:
        super().__init__()
        if dim < 1 or depth < 0 or (dim_hidden is not None and dim_hidden < 1):
            raise ValueError(
                f"CodebookMLP needs dim >= 1, depth >= 0 and dim_hidden >= 1 (or None); got "
                f"dim={dim}, depth={depth}, dim_hidden={dim_hidden}"
            )
        hidden = dim if dim_hidden is None else dim_hidden
        self.dim = dim
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
            for _ in range(depth)
        )
        self.l2norm_output = l2norm_output

    def forward(self, codes: Tensor, *, condition: Tensor) -> Tensor:
        """Transform every code for every condition row (float32, autocast off)."""
        if codes.shape[-1] != self.dim or condition.shape[-1] != self.dim:
            raise ValueError(
                f"CodebookMLP(dim={self.dim}) got codes {tuple(codes.shape)} and condition "
                f"{tuple(condition.shape)}; both must end in {self.dim}"
            )
        one_book = codes.ndim == 2
        books = codes.unsqueeze(0) if one_book else codes  # (C, K, d)
        token_shape = condition.shape[:-1]
        with torch.autocast(device_type=codes.device.type, enabled=False):
            weight, bias = self.proj_in.weight.float(), self.proj_in.bias.float()
            # proj_in([condition, code]) = W_cond·condition + W_code·code + b, computed as a
            # (N, 1, d) + (C, 1, K, d) broadcast instead of concatenating N·K pairs
            cond = F.linear(condition.reshape(-1, self.dim).float(), weight[:, : self.dim])
            code = F.linear(books.float(), weight[:, self.dim :], bias)
            x = cond[None, :, None, :] + code[:, None, :, :]  # (C, N, K, d)
            for block in self.layers:
                x = x + _float_block(block, x)
            if self.l2norm_output:
                x = F.normalize(x, dim=-1)
        x = x.reshape(books.shape[0], *token_shape, books.shape[1], self.dim)
        return x[0] if one_book else x


def _float_block(block: nn.Sequential, x: Tensor) -> Tensor:
    """Linear -> SiLU -> Linear with float32 weights (the module may hold another dtype)."""
    first, act, last = block
    h = F.linear(x, first.weight.float(), first.bias.float())
    return F.linear(act(h), last.weight.float(), last.bias.float())
