"""HierarchicalVQ: eval outputs and indices equal the reference library's after loading its
state; the residual pyramid by a direct computation; the slots layout round trip, prefixes,
masks and non-finite tokens; nested dropout keeps a prefix."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from src.quantizers import HierarchicalVQ

CASES: list[tuple[dict[str, Any], tuple[int, ...]]] = [
    (
        {"dim": 8, "codebook_size": 32, "scales": (1, 2, 4, 7), "accept_image_fmap": True},
        (2, 8, 7, 7),
    ),
    (
        {
            "dim": 8,
            "codebook_size": 32,
            "scales": (1, 3, 8),
            "shared_codebook": False,
            "share_quant_resi": 0,
            "quant_resi": 0.3,
        },
        (2, 8, 8),
    ),
    (
        {
            "dim": 8,
            "codebook_size": (16, 32, 64),
            "scales": (2, 4, 10),
            "shared_codebook": False,
            "share_quant_resi": 2,
            "channel_first": False,
        },
        (2, 10, 8),
    ),
    (
        {
            "dim": 4,
            "codebook_size": 16,
            "scales": ((1, 2, 2), (2, 3, 3)),
            "accept_3d_fmap": True,
            "quant_resi": 0.0,
        },
        (1, 4, 2, 3, 3),
    ),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_eval_outputs_and_indices_equal_the_reference(case: int) -> None:
    reference = pytest.importorskip("vector_quantize_pytorch")
    kwargs, shape = CASES[case]
    torch.manual_seed(case)
    theirs = reference.HierarchicalVQ(**kwargs)
    x = torch.randn(*shape)
    theirs.train()(x)  # k-means init and one EMA step
    with torch.no_grad():  # distinct codes: k-means on a handful of pooled cells repeats codes
        for module in theirs.modules():
            if hasattr(module, "_codebook"):
                module._codebook.embed.copy_(torch.randn_like(module._codebook.embed))
    ours = HierarchicalVQ(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    want, got = theirs.eval()(x), ours.eval()(x)
    torch.testing.assert_close(got.quantized, want[0], atol=1e-5, rtol=0)
    assert len(got.indices) == len(want[1])
    for mine, reference_indices in zip(got.indices, want[1], strict=True):
        assert torch.equal(mine, reference_indices)
    decoded = theirs.get_output_from_indices(want[1])
    torch.testing.assert_close(
        ours.get_output_from_indices(got.indices), decoded, atol=1e-5, rtol=0
    )
    assert torch.equal(ours.decode_indices(got.indices), got.quantized)


def test_pyramid_by_direct_computation() -> None:
    torch.manual_seed(0)
    hq = HierarchicalVQ(dim=4, codebook_size=16, scales=(1, 2, 6), kmeans_init=False).eval()
    x = torch.randn(3, 4, 6)
    out = hq(x)
    codebook = hq.vq.codebook.reshape(16, 4)
    residual, total = x, torch.zeros_like(x)
    for level, size in enumerate((1, 2, 6)):
        pooled = F.adaptive_avg_pool1d(residual, size).transpose(1, 2)  # (B, size, 4)
        nearest = torch.cdist(pooled, codebook.expand(3, -1, -1)).argmin(-1)
        assert torch.equal(out.indices[level], nearest)
        codes = codebook[nearest].transpose(1, 2)
        if size != 6:
            codes = F.interpolate(codes, size=6, mode="linear", align_corners=False)
        codes = hq.phi_shared(codes)
        total, residual = total + codes, residual - codes
    torch.testing.assert_close(out.quantized, total)
    assert ((x - out.quantized) ** 2).mean() < (x**2).mean()


def test_slots_round_trip_prefixes_and_next_scale_sequence() -> None:
    torch.manual_seed(0)
    kwargs = {"dim": 8, "codebook_size": 32, "scales": (1, 2, 4, 8, 30), "channel_first": False}
    slots_hq = HierarchicalVQ(**kwargs, indices_layout="slots")
    levels_hq = HierarchicalVQ(**kwargs)
    x = torch.randn(2, 20, 8)
    slots_hq.train()(x)
    levels_hq.load_state_dict(slots_hq.state_dict())
    slots_hq.eval(), levels_hq.eval()
    # capped at the 20 tokens in the slots layout: the same as scales (1, 2, 4, 8, 20)
    capped = HierarchicalVQ(**{**kwargs, "scales": (1, 2, 4, 8, 20)}).eval()
    capped.load_state_dict(slots_hq.state_dict())
    out, ref = slots_hq(x), capped(x)
    assert out.indices.shape == (2, 20, 5) and slots_hq.num_codebooks == 5
    assert torch.equal(out.quantized, ref.quantized)
    assert torch.equal(slots_hq.slots_to_levels(out.indices, (20,))[2], ref.indices[2])
    assert torch.equal(slots_hq.decode_indices(out.indices), out.quantized)
    # a coarse prefix decodes like the stack with the finer levels dropped (-1)
    prefix = slots_hq.decode_indices(out.indices[..., :2])
    dropped = out.indices.clone()
    dropped[..., 2:] = -1
    assert torch.equal(prefix, slots_hq.decode_indices(dropped))
    assert not torch.equal(prefix, out.quantized)
    # the next-scale sequence (VAR's token order) and back
    levels = levels_hq(x).indices
    sequence = levels_hq.levels_to_sequence(levels)
    assert sequence.shape == (2, 1 + 2 + 4 + 8 + 30)
    assert all(
        torch.equal(a, b)
        for a, b in zip(levels_hq.sequence_to_levels(sequence), levels, strict=True)
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tokens_are_masked_out(value: float) -> None:
    torch.manual_seed(0)
    kwargs = {
        "dim": 4,
        "codebook_size": 16,
        "scales": (1, 3, 9),
        "channel_first": False,
        "indices_layout": "slots",
    }
    hq = HierarchicalVQ(**kwargs).train()
    twin = HierarchicalVQ(**kwargs).train()
    twin.load_state_dict(hq.state_dict())
    x = torch.randn(2, 9, 4)
    bad = x.clone()
    bad[0, 4, 2] = value
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 4] = False
    torch.manual_seed(1)
    out = hq(bad)
    torch.manual_seed(1)
    ref = twin(x, mask=mask)
    for key, tensor in hq.state_dict().items():
        assert torch.isfinite(tensor).all(), key
        torch.testing.assert_close(tensor, twin.state_dict()[key])
    assert torch.equal(out.quantized, ref.quantized) and torch.isfinite(out.quantized).all()
    assert torch.equal(out.indices, ref.indices) and (out.indices[0, 4] == -1).all()
    assert torch.isfinite(out.loss)
    assert torch.equal(hq.eval().decode_indices(hq(bad).indices)[0, 4], torch.zeros(4))


def test_nested_dropout_keeps_a_prefix_of_levels() -> None:
    torch.manual_seed(0)
    hq = HierarchicalVQ(
        dim=4,
        codebook_size=16,
        scales=(1, 2, 4),
        nested_dropout=1.0,
        kmeans_init=False,
        decay=1.0,
        threshold_ema_dead_code=0,
    ).train()
    x = torch.randn(2, 4, 4)
    cutoffs = set()
    for _ in range(12):
        quantized, indices, _, cutoff = hq(x, return_cutoff=True)
        cutoffs.add(cutoff)
        # the output is the prefix of levels 0..cutoff: the decode with the rest dropped
        dropped = [i if k <= cutoff else torch.full_like(i, -1) for k, i in enumerate(indices)]
        torch.testing.assert_close(quantized, hq.get_output_from_indices(dropped))
    assert cutoffs == {0, 1}  # never all levels with nested_dropout=1 and 3 levels


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="non-decreasing"):
        HierarchicalVQ(dim=4, codebook_size=8, scales=(4, 2))
    with pytest.raises(ValueError, match="one codebook size for every level"):
        HierarchicalVQ(dim=4, codebook_size=(8, 16), scales=(1, 2))
    with pytest.raises(ValueError, match="indices_layout"):
        HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2), indices_layout="flat")
    hq = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2))
    with pytest.raises(ValueError, match=r"\(batch, dim, \*spatial\)"):
        hq(torch.randn(2, 5, 3))
