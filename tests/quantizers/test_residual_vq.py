"""ResidualVQ / GroupedResidualVQ and the generic residual stack: guide shapes, brute-force
residual values, quantize dropout (and its cross-rank agreement), decoding, shared codebooks."""

from __future__ import annotations

import itertools

import pytest
import torch

from src.quantizers import (
    FSQ,
    GroupedResidualVQ,
    ResidualStack,
    ResidualVQ,
    build_quantizer,
    install_communicator,
)
from src.quantizers.residual_vq import ResidualVQCodesOutput, ResidualVQOutput


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class FakeCommunicator:
    """Rank 1 of 2 whose broadcasts deliver a fixed 'rank 0' value; records every call."""

    rank = 1
    world_size = 2

    def __init__(self, broadcast_value: int) -> None:
        self.value = broadcast_value
        self.broadcasts: list[tuple[torch.Tensor, int]] = []

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack([tensor, tensor])

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self.broadcasts.append((tensor.clone(), src))
        return torch.full_like(tensor, self.value)


def _clustered(n: int, dim: int, centres: int = 64) -> torch.Tensor:
    """Tokens around a few centres at several scales, so every depth has structure to find."""
    coarse = torch.randn(centres, dim) * 3
    return coarse[torch.randint(centres, (1, n))] + torch.randn(1, n, dim)


# ---- the guide's examples ---------------------------------------------------------------------


def test_guide_residual_vq() -> None:
    rvq = ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024)
    x = torch.randn(1, 1024, 256)
    out = rvq(x)
    assert isinstance(out, ResidualVQOutput)
    quantized, indices, commit_loss = out
    assert (quantized.shape, indices.shape, commit_loss.shape) == (
        (1, 1024, 256),
        (1, 1024, 8),
        (1, 8),
    )
    out = rvq(x, return_all_codes=True)
    assert isinstance(out, ResidualVQCodesOutput)
    quantized, indices, commit_loss, all_codes = out
    assert all_codes.shape == (8, 1, 1024, 256)
    assert torch.isfinite(commit_loss).all() and (commit_loss > 0).all()


def test_guide_kmeans_init_example() -> None:
    rvq = ResidualVQ(
        dim=256, codebook_size=256, num_quantizers=4, kmeans_init=True, kmeans_iters=10
    )
    quantized, indices, commit_loss = rvq(torch.randn(1, 1024, 256))
    assert (quantized.shape, indices.shape, commit_loss.shape) == (
        (1, 1024, 256),
        (1, 1024, 4),
        (1, 4),
    )
    assert all(bool(layer.initted) for layer in rvq.layers)


def test_guide_grouped_residual_vq() -> None:
    grvq = GroupedResidualVQ(dim=256, num_quantizers=8, groups=2, codebook_size=1024)
    quantized, indices, commit_loss = grvq(torch.randn(1, 1024, 256))
    assert (quantized.shape, indices.shape, commit_loss.shape) == (
        (1, 1024, 256),
        (2, 1, 1024, 8),
        (2, 1, 8),
    )
    assert grvq.num_codebooks == 16 and grvq.codebook_size == 1024


def test_guide_shared_codebook_with_stochastic_sampling() -> None:
    rvq = ResidualVQ(
        dim=256,
        num_quantizers=8,
        codebook_size=1024,
        stochastic_sample_codes=True,
        sample_codebook_temp=0.1,
        shared_codebook=True,
    )
    layer = rvq.layers[0]
    assert layer.stochastic_sample_codes and layer.sample_codebook_temp == 0.1
    quantized, indices, commit_loss = rvq(torch.randn(1, 1024, 256))
    assert (quantized.shape, indices.shape, commit_loss.shape) == (
        (1, 1024, 256),
        (1, 1024, 8),
        (1, 8),
    )


def test_registered_names_and_framework_attributes() -> None:
    rvq = build_quantizer("rvq", dim=32, num_quantizers=3, codebook_size=16)
    assert isinstance(rvq, ResidualVQ) and (rvq.codebook_size, rvq.num_codebooks) == (16, 3)
    shared = build_quantizer("rvq_shared", dim=32, num_quantizers=3, codebook_size=16)
    assert shared.shared_codebook
    grvq = build_quantizer("grvq", dim=32, groups=2, num_quantizers=3, codebook_size=16)
    assert grvq.num_codebooks == 6


# ---- residual values --------------------------------------------------------------------------


def test_each_depth_picks_the_nearest_code_of_its_residual_and_error_shrinks() -> None:
    x = _clustered(2048, 8)
    rvq = ResidualVQ(dim=8, num_quantizers=4, codebook_size=32, kmeans_init=True)
    rvq(x)  # k-means-initialises each depth on its residuals
    rvq.eval()
    quantized, indices, _ = rvq(x)
    residual = x
    errors = []
    total = torch.zeros_like(x)
    for depth, codebook in enumerate(rvq.codebooks):
        brute = torch.cdist(residual[0], codebook).argmin(-1)
        assert torch.equal(indices[0, :, depth], brute)
        total = total + codebook[brute][None]
        residual = x - total
        errors.append(residual.norm().item())
        # the first k depths alone give the k-layer output
        assert torch.allclose(rvq(x, num_kept=depth + 1).quantized, total, atol=1e-5)
    assert all(b < 0.95 * a for a, b in itertools.pairwise(errors)), errors
    assert torch.allclose(quantized, total, atol=1e-5)


def test_loss_is_each_depth_commitment_and_gradients_reach_the_input() -> None:
    rvq = ResidualVQ(
        dim=8, num_quantizers=3, codebook_size=16, commitment_weight=0.5, ema_update=False
    )
    x = torch.randn(2, 50, 8, requires_grad=True)
    quantized, indices, loss = rvq(x)
    codes = rvq.get_codes_from_indices(indices)
    residual = x.detach()
    for depth in range(3):
        expected = 0.5 * (residual - codes[depth]).pow(2).mean()
        assert loss[0, depth].item() == pytest.approx(expected.item(), rel=1e-5)
        residual = residual - codes[depth]
    (quantized.sum() + loss.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_projection_when_codebook_dim_differs() -> None:
    rvq = ResidualVQ(dim=32, codebook_dim=8, num_quantizers=3, codebook_size=16)
    quantized, _indices, _, all_codes = rvq(torch.randn(2, 10, 32), return_all_codes=True)
    assert quantized.shape == (2, 10, 32) and all_codes.shape == (3, 2, 10, 8)
    assert rvq.codebooks.shape == (3, 16, 8)
    assert all(isinstance(layer.project_in, torch.nn.Identity) for layer in rvq.layers)
    expected = rvq.project_out(all_codes.sum(0))
    assert torch.allclose(quantized, expected, atol=1e-5)


# ---- quantize dropout -------------------------------------------------------------------------


def _dropout_rvq(**kwargs: object) -> ResidualVQ:
    # a codebook that never moves, so decoding after the step sees the codes forward used
    return ResidualVQ(
        dim=8, num_quantizers=6, codebook_size=16, quantize_dropout=True, ema_update=False, **kwargs
    )


def test_quantize_dropout_drops_trailing_depths_with_minus_one_and_zero_loss() -> None:
    rvq = _dropout_rvq()
    x = torch.randn(2, 40, 8)
    seen = set()
    for _ in range(60):
        quantized, indices, loss = rvq(x)
        kept = int((indices[0, 0] >= 0).sum())
        seen.add(kept)
        assert (indices[..., :kept] >= 0).all() and (indices[..., kept:] == -1).all()
        assert (loss[0, :kept] > 0).all() and (loss[0, kept:] == 0).all()
        assert torch.allclose(quantized, rvq.get_output_from_indices(indices), atol=1e-5)
        kept_codes = rvq.get_codes_from_indices(indices[..., :kept])
        assert torch.allclose(quantized, kept_codes.sum(0), atol=1e-5)
    assert seen == {1, 2, 3, 4, 5, 6}
    rvq.eval()
    assert (rvq(x).indices >= 0).all()  # no dropout outside training


def test_quantize_dropout_cutoff_and_multiple_of() -> None:
    rvq = _dropout_rvq(quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=4)
    counts = {int((rvq(torch.randn(1, 8, 8)).indices[0, 0] >= 0).sum()) for _ in range(40)}
    assert counts == {4, 6}  # kept in [2, 6] rounded up to multiples of 4, capped at 6
    with pytest.raises(ValueError, match="cutoff_index"):
        _dropout_rvq(quantize_dropout_cutoff_index=6)


def test_quantize_dropout_depth_comes_from_rank_zero() -> None:
    rvq = _dropout_rvq()
    comm = FakeCommunicator(broadcast_value=2)
    assert install_communicator(rvq, comm) >= 1
    for _ in range(10):
        indices = rvq(torch.randn(1, 16, 8)).indices
        assert (indices[..., :2] >= 0).all() and (indices[..., 2:] == -1).all()
    assert len(comm.broadcasts) == 10 and all(src == 0 for _, src in comm.broadcasts)


def test_grouped_dropout_uses_one_depth_for_all_groups() -> None:
    grvq = GroupedResidualVQ(
        dim=16, groups=2, num_quantizers=6, codebook_size=16, quantize_dropout=True
    )
    comm = FakeCommunicator(broadcast_value=3)
    grvq.set_communicator(comm)  # the top-level call reaches every group's stack and layers
    assert all(vq.communicator is comm for rvq in grvq.rvqs for vq in rvq.layers)
    indices = grvq(torch.randn(1, 16, 16)).indices
    assert (indices[..., :3] >= 0).all() and (indices[..., 3:] == -1).all()
    assert len(comm.broadcasts) == 1  # drawn once per step, not once per group


# ---- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("codebook_dim", [None, 4])
def test_get_output_from_indices_equals_eval_forward(codebook_dim: int | None) -> None:
    rvq = ResidualVQ(dim=8, codebook_dim=codebook_dim, num_quantizers=4, codebook_size=16)
    x = torch.randn(2, 30, 8)
    rvq(x)
    rvq.eval()
    quantized, indices, _ = rvq(x)
    assert torch.equal(rvq.get_output_from_indices(indices), quantized)


def test_minus_one_entries_and_missing_depths_decode_to_zero() -> None:
    rvq = ResidualVQ(dim=8, num_quantizers=4, codebook_size=16).eval()
    _, indices, _ = rvq(torch.randn(2, 30, 8))
    dropped = torch.rand(indices.shape) < 0.3
    holed = indices.masked_fill(dropped, -1)
    codes = rvq.codebooks
    expected = torch.zeros(2, 30, 8)
    for depth in range(4):
        chosen = codes[depth][holed[..., depth].clamp_min(0)]
        expected += chosen.masked_fill(dropped[..., depth, None], 0.0)
    assert torch.allclose(rvq.get_output_from_indices(holed), expected, atol=1e-6)
    coarse = rvq.get_output_from_indices(indices[..., :2])
    assert torch.allclose(coarse, codes[0][indices[..., 0]] + codes[1][indices[..., 1]])


def test_image_feature_maps_and_mask() -> None:
    rvq = ResidualVQ(dim=16, num_quantizers=3, codebook_size=8, accept_image_fmap=True).eval()
    fmap = torch.randn(2, 16, 4, 5)
    quantized, indices, _ = rvq(fmap)
    assert quantized.shape == (2, 16, 4, 5) and indices.shape == (2, 4, 5, 3)
    assert torch.equal(rvq.get_output_from_indices(indices), quantized)
    seq = ResidualVQ(dim=16, num_quantizers=3, codebook_size=8).eval()
    mask = torch.rand(2, 20) > 0.3
    quantized, indices, _ = seq(torch.randn(2, 20, 16), mask=mask)
    assert (indices[~mask] == -1).all() and (indices[mask] >= 0).all()
    assert (quantized[~mask] == 0).all()


def test_bad_input_names_the_expected_layout() -> None:
    with pytest.raises(ValueError, match=r"\(batch, seq, dim=8\)"):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=4)(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="height, width"):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=4, accept_image_fmap=True)(
            torch.randn(2, 5, 8)
        )
    with pytest.raises(ValueError, match="divisible"):
        GroupedResidualVQ(dim=10, groups=3, num_quantizers=2, codebook_size=4)


# ---- shared codebook --------------------------------------------------------------------------


def test_shared_codebook_is_one_codebook_with_one_pooled_ema_step() -> None:
    decay, eps, size = 0.8, 1e-5, 32
    rvq = ResidualVQ(
        dim=8, num_quantizers=4, codebook_size=size, shared_codebook=True, decay=decay, eps=eps
    )
    layers = rvq.layers
    assert all(layer is layers[0] for layer in layers)
    assert sum(key.endswith(".embed") for key in rvq.state_dict()) == 1
    vq = layers[0]
    embed, cluster, avg = vq.embed.clone(), vq.cluster_size.clone(), vq.embed_avg.clone()

    x = torch.randn(2, 100, 8)
    _, indices, _ = rvq(x)
    # every depth matched against the same, not yet updated, codebook
    residual, inputs = x.reshape(-1, 8), []
    for depth in range(4):
        inputs.append(residual)
        brute = torch.cdist(residual, embed).argmin(-1)
        assert torch.equal(indices.reshape(-1, 4)[:, depth], brute)
        residual = residual - embed[brute]
    pooled = torch.cat(inputs)
    idx = indices.reshape(-1, 4).t().reshape(-1)
    counts = torch.bincount(idx, minlength=size).float()
    sums = torch.zeros(size, 8).index_add_(0, idx, pooled)
    new_cluster = decay * cluster + (1 - decay) * counts
    new_avg = decay * avg + (1 - decay) * sums
    total = new_cluster.sum()
    smoothed = (new_cluster + eps) / (total + size * eps) * total
    assert torch.allclose(vq.cluster_size, new_cluster, atol=1e-5)
    assert torch.allclose(vq.embed, new_avg / smoothed[:, None], atol=1e-5)
    assert torch.equal(rvq.codebooks[0], rvq.codebooks[3])


def test_shared_codebook_kmeans_init_and_dropout() -> None:
    rvq = ResidualVQ(
        dim=8,
        num_quantizers=4,
        codebook_size=16,
        shared_codebook=True,
        kmeans_init=True,
        quantize_dropout=True,
    )
    for _ in range(5):
        quantized, _indices, loss = rvq(_clustered(256, 8))
        assert torch.isfinite(quantized).all() and torch.isfinite(loss).all()
    assert bool(rvq.layers[0].initted)


# ---- grouping and reuse -----------------------------------------------------------------------


def test_grouped_equals_separate_residual_vqs_on_feature_slices() -> None:
    grvq = GroupedResidualVQ(dim=16, groups=2, num_quantizers=3, codebook_size=8)
    x = torch.randn(2, 25, 16)
    grvq(x)
    grvq.eval()
    quantized, indices, loss = grvq(x)
    first, second = (rvq.eval() for rvq in grvq.rvqs)
    q0, i0, l0 = first(x[..., :8])
    q1, i1, l1 = second(x[..., 8:])
    assert torch.equal(quantized, torch.cat([q0, q1], dim=-1))
    assert torch.equal(indices, torch.stack([i0, i1]))
    assert torch.equal(loss, torch.stack([l0, l1]))
    assert torch.equal(grvq.get_output_from_indices(indices), quantized)
    assert grvq.get_codes_from_indices(indices).shape == (2, 3, 2, 25, 8)
    all_codes = grvq(x, return_all_codes=True).all_codes
    assert all_codes.shape == (2, 3, 2, 25, 8)


def test_stack_reuses_other_layer_families() -> None:
    """The protocol with FSQ layers: no loss field, decoded with `indices_to_codes`."""
    layers = [FSQ(levels=[5, 5, 5], dim=8) for _ in range(3)]
    stack = ResidualStack(layers, decode="indices_to_codes").eval()
    x = torch.randn(2, 30, 8)
    quantized, indices, losses, all_codes = stack(x)
    assert losses is None and all_codes is None and indices.shape == (2, 30, 3)
    assert torch.equal(stack.get_output_from_indices(indices), quantized)
    with pytest.raises(ValueError, match="no decode method"):
        ResidualStack([torch.nn.Linear(2, 2)])
