"""Shared quantizer kernels against brute-force references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src.quantizers.kernels import (
    cluster_statistics,
    cosine_rotate_commit,
    kmeans,
    kmeans_plusplus_init,
    l2_normalize,
    nearest_code,
    rotate_to,
    row_argmax,
    straight_through,
    unit_rows,
    unit_rows_and_scale,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("block", [2**28, 64])  # 64 elements forces row blocks of size 2
def test_nearest_code_equals_cdist_argmin(block: int) -> None:
    x, codebook = torch.randn(300, 16), torch.randn(32, 16)
    expected = torch.cdist(x, codebook).argmin(dim=-1)
    got = nearest_code(x, codebook, max_block_elements=block)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)


@pytest.mark.parametrize("num_codes", [1000, 1024, 4096])  # 1000: not whole chunks
def test_row_argmax_is_the_first_maximum(num_codes: int) -> None:
    scores = torch.randn(97, num_codes)
    assert torch.equal(row_argmax(scores), scores.argmax(dim=-1))
    tied = scores.round(decimals=0)  # many equal maxima per row: the first one must win
    first = (tied == tied.amax(dim=-1, keepdim=True)).float().argmax(dim=-1)
    assert torch.equal(row_argmax(tied), first)


@pytest.mark.parametrize("cosine", [False, True])
def test_nearest_code_large_codebook_equals_float64_brute_force(cosine: bool) -> None:
    x, codebook = torch.randn(700, 32), torch.randn(2048, 32)
    x64, c64 = x.double(), codebook.double()
    if cosine:
        x64, c64 = F.normalize(x64, dim=-1), F.normalize(c64, dim=-1)
    expected = torch.cdist(x64, c64).argmin(dim=-1)
    assert torch.equal(nearest_code(x, codebook, use_cosine_sim=cosine), expected)


def test_nearest_code_cosine_equals_argmax_of_normalised_dot() -> None:
    x, codebook = torch.randn(300, 16), torch.randn(32, 16) * torch.rand(32, 1) * 10
    expected = (F.normalize(x, dim=-1) @ F.normalize(codebook, dim=-1).t()).argmax(dim=-1)
    assert torch.equal(nearest_code(x, codebook, use_cosine_sim=True), expected)


def test_nearest_code_is_float32_under_bf16_autocast() -> None:
    x, codebook = torch.randn(500, 64), torch.randn(256, 64)
    expected = torch.cdist(x, codebook).argmin(dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nearest_code(x, codebook)
        got_bf16_in = nearest_code(x.bfloat16(), codebook)
    assert torch.equal(got, expected)
    assert torch.equal(got_bf16_in, torch.cdist(x.bfloat16().float(), codebook).argmin(-1))


def test_zero_vectors_do_not_give_nan() -> None:
    zeros = torch.zeros(4, 8)
    assert torch.equal(l2_normalize(zeros), zeros)
    idx = nearest_code(zeros, torch.randn(5, 8), use_cosine_sim=True)
    assert idx.shape == (4,) and ((idx >= 0) & (idx < 5)).all()


def test_cluster_statistics_equals_one_hot() -> None:
    x, idx = torch.randn(50, 6), torch.randint(0, 9, (50,))
    weights = (torch.rand(50) > 0.3).float()
    one_hot = F.one_hot(idx, 9).float() * weights[:, None]
    counts, sums = cluster_statistics(x, idx, 9, weights)
    torch.testing.assert_close(counts, one_hot.sum(0))
    torch.testing.assert_close(sums, one_hot.t() @ x)
    counts, sums = cluster_statistics(x, idx, 9)
    torch.testing.assert_close(counts, F.one_hot(idx, 9).float().sum(0))


def _blobs(centres: torch.Tensor, per: int, noise: float = 0.01) -> torch.Tensor:
    x = centres.repeat_interleave(per, dim=0)
    return x + noise * torch.randn_like(x)


def _max_centre_error(found: torch.Tensor, centres: torch.Tensor) -> float:
    return torch.cdist(centres, found).min(dim=-1).values.max().item()


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_recovers_separated_clusters(seed: int) -> None:
    torch.manual_seed(seed)
    centres = torch.randn(6, 8) * 10
    samples = _blobs(centres, 40)[torch.randperm(240)]
    found, counts = kmeans(samples, 6, num_iters=10)
    assert _max_centre_error(found, centres) < 0.05
    assert torch.equal(counts.sort().values, torch.full((6,), 40.0))


def test_kmeans_empty_cluster_keeps_its_centre() -> None:
    samples = _blobs(torch.tensor([[0.0, 0.0], [5.0, 5.0]]), 10)
    init = torch.tensor([[0.1, 0.0], [5.0, 4.9], [1000.0, 1000.0]])
    found, counts = kmeans(samples, 3, num_iters=5, init=init)
    assert torch.isfinite(found).all()
    assert torch.equal(found[2], init[2]) and counts[2] == 0


def test_kmeans_cosine_gives_unit_centres() -> None:
    found, _ = kmeans(torch.randn(100, 8), 4, num_iters=3, use_cosine_sim=True)
    torch.testing.assert_close(found.norm(dim=-1), torch.ones(4))


def test_kmeans_more_clusters_than_samples() -> None:
    found, counts = kmeans(torch.randn(3, 4), 8, num_iters=3)
    assert found.shape == (8, 4) and torch.isfinite(found).all() and counts.sum() == 3


def _rotation_reference_grad(e: torch.Tensor, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Autograd through q_out = λ R e with R = I - 2rrᵀ + 2wuᵀ and λ held constant."""
    e = e.clone().requires_grad_(True)
    u, w = F.normalize(e.detach(), dim=-1), F.normalize(q, dim=-1)
    r = F.normalize(u + w, dim=-1)
    eye = torch.eye(e.shape[-1]).expand(e.shape[0], -1, -1)
    rot = eye - 2 * torch.einsum("ni,nj->nij", r, r) + 2 * torch.einsum("ni,nj->nij", w, u)
    lam = q.norm(dim=-1) / e.detach().norm(dim=-1)
    out = lam[:, None] * torch.einsum("nij,nj->ni", rot, e)
    torch.testing.assert_close(out.detach(), q, atol=1e-4, rtol=1e-4)  # R maps e onto q
    (out * g).sum().backward()
    return e.grad


def test_rotation_trick_value_and_gradient() -> None:
    e, q, g = torch.randn(20, 7), torch.randn(20, 7), torch.randn(20, 7)
    leaf = e.clone().requires_grad_(True)
    out = rotate_to(leaf, q)
    assert torch.equal(out.detach(), q)
    (out * g).sum().backward()
    torch.testing.assert_close(leaf.grad, _rotation_reference_grad(e, q, g))


def test_rotation_trick_degenerate_cases_have_no_nan() -> None:
    e = torch.stack([torch.zeros(4), torch.tensor([1.0, 2.0, 3.0, 4.0])])
    q = torch.stack([torch.ones(4), -2 * torch.tensor([1.0, 2.0, 3.0, 4.0])])  # zero, antipodal
    leaf = e.clone().requires_grad_(True)
    out = rotate_to(leaf, q)
    assert torch.equal(out.detach(), q)
    g = torch.randn(2, 4)
    (out * g).sum().backward()
    assert torch.isfinite(leaf.grad).all()
    torch.testing.assert_close(leaf.grad[0], g[0])  # zero input: straight-through
    # antipodal: the map is λ(I - 2uuᵀ), a reflection through the plane normal to e
    u = F.normalize(e[1], dim=0)
    expected = 2.0 * (g[1] - 2 * (g[1] @ u) * u)
    torch.testing.assert_close(leaf.grad[1], expected)


def test_straight_through_value_and_gradient() -> None:
    e, q, g = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3), torch.randn(5, 3)
    out = straight_through(e, q)
    assert torch.equal(out.detach(), q)
    (out * g).sum().backward()
    assert torch.equal(e.grad, g)


def test_nearest_code_compiles_without_graph_breaks() -> None:
    compiled = torch.compile(nearest_code, fullgraph=True, backend="aot_eager")
    x, codebook = torch.randn(64, 8), torch.randn(16, 8)
    assert torch.equal(compiled(x, codebook), nearest_code(x, codebook))
    assert torch.equal(compiled(x, codebook, True), nearest_code(x, codebook, True))


@pytest.mark.parametrize("num_clusters", [7, 600])  # 600 > 256 rounds: several draws a round
def test_kmeans_plusplus_picks_distinct_samples(num_clusters: int) -> None:
    samples = torch.randn(1000, 4)
    centres = kmeans_plusplus_init(samples, num_clusters)
    assert centres.shape == (num_clusters, 4)
    assert torch.unique(centres, dim=0).shape[0] == num_clusters
    assert (centres[:, None] == samples[None]).all(-1).any(-1).all()  # centres are samples


def test_cosine_rotate_commit_equals_normalise_rotate_and_mse() -> None:
    x = torch.randn(40, 12) * 3
    x[0] = 0.0  # zero latent: straight-through
    codes = l2_normalize(torch.randn(40, 12))
    codes[1] = -l2_normalize(x[1])  # antipodal: reflection
    codes[2] = 0.0  # zero code
    g, weight = torch.randn(40, 12), 0.7

    ref_leaf = x.clone().requires_grad_(True)
    unit = unit_rows(ref_leaf)
    ref_out, ref_loss = rotate_to(unit, codes), weight * F.mse_loss(unit, codes)
    ((ref_out * g).sum() + 3.0 * ref_loss).backward()

    leaf = x.clone().requires_grad_(True)
    fused_unit, scale = unit_rows_and_scale(leaf)
    out, loss = cosine_rotate_commit(leaf, fused_unit, scale, codes, weight)
    ((out * g).sum() + 3.0 * loss).backward()

    assert torch.equal(out.detach(), codes)
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-4, atol=1e-5)
