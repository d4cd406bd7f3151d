"""Every registered quantizer keeps the contract of src/quantizers/contract.py: sizes,
`decode_indices` equal to the eval forward (and its reference aliases), index range errors
(issue 16 fault 5) and `aux_loss`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from src.quantizers import (
    FSQ,
    LFQ,
    IndexRangeError,
    ResidualVQ,
    VectorQuantize,
    aux_loss,
    build_quantizer,
    check_contract,
    index_layout,
    index_slots,
    quantizer_class,
    registered_quantizers,
    slots_to_indices,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "quantizer"
DIM = 16
# quantizers whose decode accepts the mask value -1 (masked positions, dropped residual layers)
MASKABLE = {"vq", "rvq", "rvq_shared", "grvq", "rfsq", "grfsq", "rlfq", "grlfq", "rsimvq"}
MASKABLE |= {"fsq", "lfq", "bsq", "bsq_huge"}  # -1 marks a non-finite token
MASKABLE |= {"fsp", "evo_lfq", "binary_mapper", "hierarchical_vq"}  # the same (issue 17)
MASKABLE |= {"rvq_beam"}  # a residual VQ: -1 marks a dropped depth (issue 17)
# variants beyond the registered names' configs: heads, cosine, codebook_dim, map layouts
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "vq_heads_separate": ("vq", {"heads": 2, "separate_codebook_per_head": True}),
    "vq_heads_shared": ("vq", {"heads": 2, "codebook_dim": 4}),
    "vq_cosine": ("vq", {"use_cosine_sim": True}),
    "vq_no_codebook_dim": ("vq", {"codebook_dim": None, "codebook_size": 64}),
    "rvq_fmap": ("rvq", {"accept_image_fmap": True}),
    "grvq_fmap": ("grvq", {"accept_image_fmap": True}),
    "fsq_channel_first": ("fsq", {"channel_first": True}),
    "lfq_codebooks": ("lfq", {"num_codebooks": 2, "codebook_size": 64}),
    "latent_quantize_codebooks": ("latent_quantize", {"num_codebooks": 2}),
    "rfsq_rescaled": ("rfsq", {"refinement": "rescaled"}),  # the reference's algorithm
    "grfsq_rescaled": ("grfsq", {"refinement": "rescaled"}),
}


def config_kwargs(name: str) -> dict[str, Any]:
    """configs/quantizer/<name>.yaml without its `name` key."""
    kwargs = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    kwargs.pop("defaults", None)  # Hydra's composition list (external.yaml), not a keyword
    assert kwargs.pop("name") == name
    return kwargs


def build(case: str) -> tuple[str, torch.nn.Module, bool]:
    """(registered name, quantizer with dim=16, whether it takes channel-first maps)."""
    torch.manual_seed(0)
    name, extra = VARIANTS.get(case, (case, {}))
    kwargs = {**config_kwargs(name), "dim": DIM, **extra}
    fmap = any(kwargs.get(k) for k in ("accept_image_fmap", "channel_first"))
    return name, build_quantizer(name, **kwargs), fmap


def trained(case: str) -> tuple[str, torch.nn.Module, bool]:
    """`build(case)` after two training calls (k-means seeding, EMA), in eval mode."""
    name, quantizer, fmap = build(case)
    quantizer.train()
    for _ in range(2):
        quantizer(sample(fmap))
    return name, quantizer.eval(), fmap


def sample(fmap: bool) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, DIM, 8, 8) if fmap else torch.randn(4, 64, DIM)


BOTTLENECKS = [n for n in registered_quantizers() if n != "rpq"]


def test_every_registered_name_has_a_config() -> None:
    for name in registered_quantizers():
        assert (CONFIGS / f"{name}.yaml").is_file(), name


@pytest.mark.parametrize("case", [*BOTTLENECKS, *VARIANTS])
def test_decode_indices_equals_eval_forward(case: str) -> None:
    name, quantizer, fmap = build(case)
    report = check_contract(quantizer)
    assert report.codebook_sizes == (quantizer.codebook_size,) * quantizer.num_codebooks
    x = sample(fmap)
    quantizer.train()
    for _ in range(2):  # k-means seeding, EMA steps, dead-code revival
        out = quantizer(x)
        total = aux_loss(out)
        assert total.dtype == torch.float32 and total.ndim == 0 and torch.isfinite(total)
    quantizer.eval()
    with torch.no_grad():
        out = quantizer(x)
        decoded = quantizer.decode_indices(out.indices)
    assert decoded.dtype == out.quantized.dtype
    assert torch.equal(decoded, out.quantized), (decoded - out.quantized).abs().max()
    # the reference's names are aliases with the same result
    for alias in ("get_output_from_indices", "indices_to_codes"):
        if hasattr(quantizer, alias) and not (name == "lfq" or name.startswith("bsq")):
            with torch.no_grad():
                assert torch.equal(getattr(quantizer, alias)(out.indices), decoded), alias
    if name in ("lfq", "bsq", "bsq_huge"):
        assert torch.equal(quantizer.indices_to_codes(out.indices), decoded)
    # every index lies in its codebook; Q slots per position
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < quantizer.codebook_size
    if not fmap:
        slots = index_slots(out.indices, index_layout(quantizer, DIM))
        assert slots.shape == (4, 64, quantizer.num_codebooks)
        assert torch.equal(slots_to_indices(slots, index_layout(quantizer, DIM)), out.indices)


@pytest.mark.parametrize(
    "case", [*BOTTLENECKS, "vq_heads_separate", "lfq_codebooks", "rfsq_rescaled", "grfsq_rescaled"]
)
def test_out_of_range_indices_are_rejected(case: str) -> None:
    name, quantizer, _ = build(case)
    quantizer.eval()
    with torch.no_grad():
        indices = quantizer(sample(False)).indices.clone()
    size = quantizer.codebook_size
    for bad in (size, -2, -1):
        if bad == -1 and name in MASKABLE:
            continue
        broken = indices.clone()
        broken.view(-1)[3] = bad
        with pytest.raises(IndexRangeError) as err:
            quantizer.decode_indices(broken)
        message = str(err.value)
        assert f"index {bad}" in message and f"[0, {size})" in message
        assert type(quantizer).__name__ in message or "Residual" in message


@pytest.mark.parametrize("name", sorted(MASKABLE))
def test_mask_value_decodes_to_zero(name: str) -> None:
    _, quantizer, _ = trained(name)
    x = sample(False)
    with torch.no_grad():
        indices = quantizer(x).indices.clone()
        if indices.ndim == 2:  # plain VQ: a masked position is zero
            indices[0, 5] = -1
            assert torch.equal(quantizer.decode_indices(indices)[0, 5], torch.zeros(DIM))
            return
        # residual: -1 on the finer layers decodes like indices with those layers cut off
        full = quantizer.decode_indices(indices)
        indices[..., 1:] = -1
        coarse = quantizer.decode_indices(indices)
        assert not torch.equal(full, coarse)
        assert torch.equal(coarse, quantizer.decode_indices(indices[..., :1]))


def test_issue16_fault5_cases() -> None:
    """The exact probes of issue 16: each used to decode a wrong code or raise IndexError."""
    torch.manual_seed(0)
    heads = VectorQuantize(dim=8, codebook_size=32, heads=2, separate_codebook_per_head=True)
    with pytest.raises(IndexRangeError, match=r"index 32.*\[0, 32\)"):
        heads.get_output_from_indices(torch.tensor([[[32, 0]]]))  # head 0 -> head 1's code 0
    fsq = FSQ(levels=[8, 5, 5])  # 200 codes
    for bad in (200, -2):
        with pytest.raises(IndexRangeError, match=rf"FSQ got index {bad}"):
            fsq.indices_to_codes(torch.tensor([[bad]]))
    # -1 is the mask value (a non-finite token): zeros, no longer code 199
    assert torch.equal(fsq.indices_to_codes(torch.tensor([[-1, 199]]))[0, 0], torch.zeros(3))
    assert fsq.indices_to_codes(torch.tensor([[199]])).abs().sum() > 0
    lfq = LFQ(dim=4, codebook_size=16)
    for bad in (16, -2):
        with pytest.raises(IndexRangeError, match=rf"LFQ got index {bad}"):
            lfq.indices_to_codes(torch.tensor([[bad]]))
    assert torch.equal(lfq.indices_to_codes(torch.tensor([[-1]])), torch.zeros(1, 1, 4))
    vq = VectorQuantize(dim=8, codebook_size=32)
    with pytest.raises(IndexRangeError, match="index -2"):
        vq.get_output_from_indices(torch.tensor([[-2]]))
    with pytest.raises(IndexRangeError, match="index 32"):
        vq.get_output_from_indices(torch.tensor([[32]]))  # was torch's bare IndexError
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=32)
    with pytest.raises(IndexRangeError, match=r"ResidualVQ got index 40"):
        rvq.get_output_from_indices(torch.tensor([[[1, 40]]]))
    with pytest.raises(TypeError, match="integer"):
        vq.get_output_from_indices(torch.tensor([[1.0]]))


def test_index_only_quantizer_contract() -> None:
    """rpq: sizes and in-range (B, N, Q) indices, no loss, and no decode (a clear TypeError)."""
    assert quantizer_class("rpq").produces_quantized is False
    quantizer = build_quantizer("rpq", **config_kwargs("rpq"), dim=DIM)
    report = check_contract(quantizer)
    assert report.decodes is False and report.codebook_sizes == (256,) * 4
    indices = quantizer(sample(False))
    assert indices.shape == (4, 64, 4) and indices.dtype == torch.int64
    assert int(indices.min()) >= 0 and int(indices.max()) < 256
    assert aux_loss(indices).item() == 0.0
    assert index_layout(quantizer, DIM) == (0, True)
    with pytest.raises(TypeError, match="indices only"):
        quantizer.decode_indices(indices)


def test_aux_loss_reads_every_loss_field() -> None:
    from src.quantizers import LFQOutput, ResidualVQOutput

    q = torch.zeros(1, 2, 3)
    assert aux_loss(ResidualVQOutput(q, q.long(), torch.tensor([[1.0, 2.0]]))).item() == 3.0
    lfq = LFQOutput(q, q.long(), torch.tensor(0.5, dtype=torch.bfloat16))
    assert aux_loss(lfq).dtype == torch.float32 and aux_loss(lfq).item() == 0.5
    assert aux_loss((q, q.long(), torch.tensor([2.0]))).item() == 2.0  # reference tuples
    assert aux_loss((q, q.long())).item() == 0.0
    with pytest.raises(TypeError, match="quantizer output"):
        aux_loss([q])


def test_check_contract_names_what_is_missing() -> None:
    with pytest.raises(TypeError, match=r"codebook_size.*decode_indices"):
        check_contract(torch.nn.Linear(2, 2))
