"""LFQ / BSQ: the guide's examples, losses vs brute force over all codes, masks, layouts."""

from __future__ import annotations

import math

import pytest
import torch

from src.quantizers import BSQ, LFQ
from src.quantizers.registry import build_quantizer
from tests.quantizers.test_entropy import all_codes, brute_force_probs, entropy


def test_guide_image_example() -> None:
    quantizer = LFQ(
        codebook_size=65536,
        dim=16,
        entropy_loss_weight=0.1,
        diversity_gamma=1.0,
    )
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, entropy_aux_loss = quantizer(image_feats, inv_temperature=100.0)
    assert quantized.shape == (1, 16, 32, 32)
    assert indices.shape == (1, 32, 32)
    assert entropy_aux_loss.shape == ()
    assert (quantized == quantizer.indices_to_codes(indices)).all()


def test_guide_sequence_and_video_example() -> None:
    quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0)
    seq = torch.randn(1, 32, 16)
    quantized, *_ = quantizer(seq)
    assert seq.shape == quantized.shape
    video_feats = torch.randn(1, 16, 10, 32, 32)
    quantized, *_ = quantizer(video_feats)
    assert video_feats.shape == quantized.shape


def test_guide_multiple_codebooks_example() -> None:
    quantizer = LFQ(codebook_size=4096, dim=16, num_codebooks=4)
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, entropy_aux_loss = quantizer(image_feats)
    assert quantized.shape == (1, 16, 32, 32)
    assert indices.shape == (1, 32, 32, 4)
    assert entropy_aux_loss.shape == ()
    assert image_feats.shape == quantized.shape
    assert (quantized == quantizer.indices_to_codes(indices)).all()


def test_indices_read_signs_msb_first() -> None:
    quantizer = LFQ(codebook_size=8).eval()
    x = torch.tensor([[[0.5, -2.0, 1.0], [-0.1, -0.1, -0.1], [3.0, 3.0, 3.0]]])
    quantized, indices, loss = quantizer(x)
    assert indices.tolist() == [[0b101, 0, 0b111]]
    assert torch.equal(quantized, torch.where(x > 0, 1.0, -1.0))
    assert loss.item() == 0.0  # no auxiliary loss outside training
    assert indices.dtype == torch.int64
    assert torch.equal(quantizer.codebook, all_codes(3).float())


def test_straight_through_gradient_is_identity() -> None:
    quantizer = LFQ(codebook_size=16, entropy_loss_weight=0.0)
    x = torch.randn(2, 5, 4, requires_grad=True)
    weights = torch.randn(2, 5, 4)
    (quantizer(x).quantized * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights)


@pytest.mark.parametrize("spherical", [False, True])
def test_loss_breakdown_equals_brute_force(spherical: bool) -> None:
    """Per-sample and batch entropy against a softmax over all 2^d codes (as in MAGVIT-v2)."""
    torch.manual_seed(0)
    bits, beta, gamma, scale = 6, 3.0, 0.7, 0.5
    quantizer = LFQ(
        codebook_size=2**bits,
        entropy_loss_weight=0.3,
        commitment_loss_weight=0.2,
        diversity_gamma=gamma,
        codebook_scale=scale,
        spherical=spherical,
    ).double()
    x = torch.randn(3, 20, bits, dtype=torch.float64)
    (_, _, aux), parts = quantizer(x, inv_temperature=beta, return_loss_breakdown=True)
    z = torch.nn.functional.normalize(x, dim=-1) * scale if spherical else x
    code_value = scale / math.sqrt(bits) if spherical else scale
    probs = brute_force_probs(z.reshape(-1, bits), beta, code_value)
    sample, batch = entropy(probs).mean(), entropy(probs.mean(dim=0))
    commit = (z - torch.where(z > 0, code_value, -code_value)).pow(2).mean()
    torch.testing.assert_close(parts.per_sample_entropy, sample)
    torch.testing.assert_close(parts.batch_entropy, batch)
    torch.testing.assert_close(parts.commitment, commit)
    torch.testing.assert_close(aux, 0.3 * (sample - gamma * batch) + 0.2 * commit)


def test_multiple_codebooks_average_their_entropies() -> None:
    quantizer = LFQ(codebook_size=16, num_codebooks=3).double()
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    _, parts = quantizer(x, inv_temperature=1.0, return_loss_breakdown=True)
    z = x.reshape(-1, 3, 4)
    batch = [entropy(brute_force_probs(z[:, c], 1.0, 1.0).mean(0)) for c in range(3)]
    torch.testing.assert_close(parts.batch_entropy, torch.stack(batch).mean())


def test_mask_ignores_masked_tokens() -> None:
    torch.manual_seed(1)
    quantizer = LFQ(codebook_size=32, commitment_loss_weight=1.0).double()
    x = torch.randn(2, 12, 5, dtype=torch.float64)
    mask = torch.rand(2, 12) > 0.4
    masked_out, masked_parts = quantizer(
        x, inv_temperature=2.0, return_loss_breakdown=True, mask=mask
    )
    kept = x[mask].unsqueeze(0)  # the unmasked tokens only, as one sequence
    kept_out, kept_parts = quantizer(kept, inv_temperature=2.0, return_loss_breakdown=True)
    torch.testing.assert_close(masked_out.entropy_aux_loss, kept_out.entropy_aux_loss)
    for name in ("per_sample_entropy", "batch_entropy", "commitment"):
        torch.testing.assert_close(getattr(masked_parts, name), getattr(kept_parts, name))
    assert torch.equal(masked_out.indices[mask], kept_out.indices[0])
    garbage = x.clone()
    garbage[~mask] = 1e3  # whatever the masked tokens hold does not change the loss
    torch.testing.assert_close(
        quantizer(garbage, inv_temperature=2.0, mask=mask).loss, masked_out.loss
    )


def test_bsq_codes_lie_on_the_unit_sphere() -> None:
    quantizer = BSQ(codebook_size=2**10, dim=32)
    assert quantizer.spherical
    indices = torch.randint(0, 2**10, (4, 7))
    codes = quantizer.indices_to_codes(indices, project_out=False)
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(4, 7))
    assert torch.allclose(codes.abs(), torch.tensor(1 / math.sqrt(10)))
    plain = LFQ(codebook_size=2**12, dim=12, spherical=True)
    quantized, indices, _ = plain(torch.randn(3, 9, 12) * 50)
    torch.testing.assert_close(quantized.norm(dim=-1), torch.ones(3, 9))
    assert (quantized == plain.indices_to_codes(indices)).all()


def test_huge_bsq_trains_without_materialising_codes() -> None:
    quantizer = build_quantizer("bsq_huge", codebook_size=2**32, dim=32)
    x = torch.randn(4, 64, 32, requires_grad=True)
    out = quantizer(x)
    (out.quantized.sum() + out.loss).backward()
    assert out.indices.dtype == torch.int64 and int(out.indices.max()) < 2**32
    assert torch.isfinite(x.grad).all() and torch.isfinite(out.loss)
    assert (out.quantized == quantizer.indices_to_codes(out.indices)).all()
    with pytest.raises(ValueError, match="materialise"):
        _ = quantizer.codebook


def test_projections_and_framework_attributes() -> None:
    quantizer = LFQ(codebook_size=1024, dim=32)
    assert quantizer.has_projections and quantizer.codebook_size == 1024
    assert quantizer.num_codebooks == 1
    out = quantizer(torch.randn(2, 49, 32))
    assert out.quantized.shape == (2, 49, 32) and out.indices.shape == (2, 49)
    assert out.loss is out.entropy_aux_loss


def test_autocast_keeps_float32_and_finite() -> None:
    quantizer = LFQ(codebook_size=256, dim=32)
    x = torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(x)
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"codebook_size": 1000}, "power of two"),
        ({}, "codebook_size"),
        ({"codebook_size": 256, "dim": 10, "has_projections": False}, "has_projections=False"),
        ({"dim": 10, "num_codebooks": 3}, "divisible"),
    ],
)
def test_bad_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LFQ(**kwargs)


def test_bad_input_layout() -> None:
    quantizer = LFQ(codebook_size=256, dim=8)
    with pytest.raises(ValueError, match=r"\(batch, seq, dim=8\)"):
        quantizer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"\(batch, dim=8, \.\.\.\)"):
        quantizer(torch.randn(2, 7, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        quantizer(torch.randn(2, 5, 8), mask=torch.ones(2, 4, dtype=torch.bool))


def test_matches_reference_library_codes() -> None:
    reference = pytest.importorskip("vector_quantize_pytorch")
    x = torch.randn(2, 16, 8, 8)
    for spherical in (False, True):
        ours = LFQ(codebook_size=2**16, dim=16, spherical=spherical).eval()
        ref = reference.LFQ(codebook_size=2**16, dim=16, spherical=spherical).eval()
        (q_ours, i_ours, _), (q_ref, i_ref, _) = ours(x), ref(x)
        assert torch.equal(i_ours, i_ref.long())
        torch.testing.assert_close(q_ours, q_ref)


def test_batch_entropy_is_global_over_fake_ranks() -> None:
    """Two thread 'ranks' with the same LFQ see the batch entropy of their union."""
    import copy
    import threading

    from tests.quantizers.test_entropy import ThreadRanks

    torch.manual_seed(3)
    base = LFQ(codebook_size=2**6).double()
    shards = [torch.randn(1, 15, 6, dtype=torch.float64) for _ in range(2)]
    comm = ThreadRanks()
    results: dict[int, torch.Tensor] = {}

    def run(rank: int) -> None:
        comm.local.rank = rank
        quantizer = copy.deepcopy(base)
        quantizer.set_communicator(comm)
        _, parts = quantizer(shards[rank], inv_temperature=1.0, return_loss_breakdown=True)
        results[rank] = parts.batch_entropy.detach()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    _, union = base(torch.cat(shards, dim=1), inv_temperature=1.0, return_loss_breakdown=True)
    for rank in range(2):
        torch.testing.assert_close(results[rank], union.batch_entropy.detach())


def test_orthogonal_rotation_and_entropy_fraction() -> None:
    torch.manual_seed(4)
    quantizer = LFQ(codebook_size=2**8, orthogonal_rotation=True, frac_per_sample_entropy=0.5)
    x = torch.randn(2, 40, 8, requires_grad=True)
    quantized, indices, loss = quantizer(x)
    assert (quantized == quantizer.indices_to_codes(indices)).all()
    rotated = x.detach() @ quantizer.orthogonal_rot
    weights = 2 ** torch.arange(7, -1, -1)
    assert torch.equal(indices, ((rotated > 0).long() * weights).sum(-1))
    (quantized.sum() + loss).backward()
    assert torch.isfinite(x.grad).all()
