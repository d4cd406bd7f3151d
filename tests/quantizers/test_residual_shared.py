"""The residual and grouped families share one implementation (ResidualQuantizer around a
ResidualStack, GroupedResidual over members); checkpoints written before the grouped
families shared it still load."""

from __future__ import annotations

import pytest
import torch

from src.quantizers import (
    GroupedResidualFSQ,
    GroupedResidualLFQ,
    GroupedResidualVQ,
    ResidualFSQ,
    ResidualLFQ,
    ResidualSimVQ,
    ResidualVQ,
)
from src.quantizers.grouped import GroupedResidual
from src.quantizers.residual_quantizer import ResidualQuantizer

RESIDUAL = {
    "rvq": lambda **k: ResidualVQ(dim=8, codebook_size=16, codebook_dim=4, **k),
    "rfsq": lambda **k: ResidualFSQ(dim=8, levels=[5, 4], **k),
    "rlfq": lambda **k: ResidualLFQ(dim=8, codebook_size=16, **k),
    "rsimvq": lambda **k: ResidualSimVQ(dim=8, codebook_size=16, **k),
}
GROUPED = {
    "grvq": (lambda: GroupedResidualVQ(dim=8, groups=2, num_quantizers=3, codebook_size=16),
             "groups."),
    "grfsq": (lambda: GroupedResidualFSQ(dim=8, groups=2, num_quantizers=3, levels=[5, 4]),
              "grouped.groups."),
    "grlfq": (lambda: GroupedResidualLFQ(dim=16, groups=2, num_quantizers=3, codebook_size=16),
              "grouped.groups."),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RESIDUAL))
def test_residual_families_share_the_shell(name: str) -> None:
    """Same quantize-dropout keywords and kept-depth draw, same sizes and decode on all."""
    torch.manual_seed(0)
    quantizer = RESIDUAL[name](
        num_quantizers=4,
        quantize_dropout=True,
        quantize_dropout_cutoff_index=1,
        quantize_dropout_multiple_of=2,
    )
    assert isinstance(quantizer, ResidualQuantizer)
    assert quantizer.num_quantizers == quantizer.num_codebooks == 4
    quantizer.train()
    draws = {quantizer.draw_num_kept() for _ in range(50)}
    assert draws == {2, 4}  # uniform over [2, 4], rounded up to a multiple of 2
    quantizer.eval()
    assert quantizer.draw_num_kept() is None
    with pytest.raises(ValueError, match=r"1 <= q <= 4"):
        quantizer.decode_indices(torch.zeros(2, 3, 5, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(GROUPED))
def test_grouped_families_load_checkpoints_of_their_old_layout(name: str) -> None:
    make, old_prefix = GROUPED[name]
    torch.manual_seed(0)
    source = make()
    assert isinstance(source, GroupedResidual) and source.groups == 2
    assert source.num_codebooks == 6 and source.codebook_sizes == (source.codebook_size,) * 6
    x = torch.randn(2, 5, source.dim)
    source.train()
    source(x)  # k-means / EMA state worth carrying over
    legacy = {
        key.replace("members.", old_prefix, 1): value for key, value in source.state_dict().items()
    }
    assert legacy and all(key.startswith(old_prefix) for key in legacy)
    torch.manual_seed(1)
    target = make()
    target.load_state_dict(legacy)  # strict: every old key finds its new place
    source.eval()
    target.eval()
    with torch.no_grad():
        expected, found = source(x), target(x)
    assert torch.equal(found.indices, expected.indices)
    assert torch.equal(found.quantized, expected.quantized)
