"""VectorQuantize: heads, orthogonal regulariser, stochastic codes, masks/lens, k-means and
dead-code effects, compile, and the guide's examples that use them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from src.quantizers import VectorQuantize
from src.quantizers.kernels import nearest_code


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---- the guide's examples -------------------------------------------------------------------


def test_guide_heads_example() -> None:
    vq = VectorQuantize(
        dim=256,
        codebook_dim=32,
        heads=8,
        separate_codebook_per_head=True,
        codebook_size=8196,
        accept_image_fmap=True,
    )
    quantized, indices, loss = vq(torch.randn(1, 256, 32, 32))
    assert (quantized.shape, indices.shape, loss.shape) == ((1, 256, 32, 32), (1, 32, 32, 8), (1,))
    assert vq.num_codebooks == 8 and vq.embed.shape == (8, 8196, 32)


def test_guide_orthogonal_example() -> None:
    vq = VectorQuantize(
        dim=256,
        codebook_size=256,
        accept_image_fmap=True,
        orthogonal_reg_weight=10,
        orthogonal_reg_max_codes=128,
        orthogonal_reg_active_codes_only=False,
    )
    quantized, indices, loss = vq(torch.randn(1, 256, 32, 32))
    assert (quantized.shape, indices.shape, loss.shape) == ((1, 256, 32, 32), (1, 32, 32), (1,))
    loss.sum().backward()
    assert vq.embed.grad is not None and vq.embed.grad.abs().sum() > 0


def test_sync_codebook_keyword_is_accepted() -> None:
    for sync in (None, True, False):
        vq = VectorQuantize(dim=8, codebook_size=4, sync_codebook=sync)
        assert vq(torch.randn(1, 5, 8)).indices.shape == (1, 5)


# ---- heads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("separate", [False, True])
def test_heads_quantize_each_slice_against_its_codebook(separate: bool) -> None:
    heads, d, k = 3, 4, 10
    vq = VectorQuantize(
        dim=heads * d, codebook_dim=d, codebook_size=k, heads=heads,
        separate_codebook_per_head=separate,
    ).eval()  # fmt: skip
    x = torch.randn(2, 7, heads * d)
    quantized, indices, loss = vq(x)
    assert indices.shape == (2, 7, heads) and vq.num_codebooks == heads
    books = vq.codebook if separate else vq.codebook.expand(heads, k, d)
    assert vq.codebook.shape == ((heads, k, d) if separate else (k, d))
    slices = x.reshape(-1, heads, d)
    for h in range(heads):
        expected = torch.cdist(slices[:, h], books[h]).argmin(-1)
        assert torch.equal(indices[..., h].reshape(-1), expected)
    expected_q = torch.stack([books[h][indices[..., h]] for h in range(heads)], dim=-2)
    torch.testing.assert_close(quantized, expected_q.reshape(2, 7, heads * d))
    torch.testing.assert_close(loss, F.mse_loss(x, quantized).reshape(1))


def test_shared_codebook_pools_heads_in_the_ema() -> None:
    heads, d, k, decay = 2, 3, 5, 0.5
    vq = VectorQuantize(dim=heads * d, codebook_dim=d, codebook_size=k, heads=heads, decay=decay)
    before = vq.cluster_size.clone()
    _, indices, _ = vq(torch.randn(1, 9, heads * d))
    counts = torch.bincount(indices.reshape(-1), minlength=k).float()  # both heads counted
    assert counts.sum() == 18
    torch.testing.assert_close(vq.cluster_size, decay * before + (1 - decay) * counts)


def test_separate_codebooks_update_independently() -> None:
    heads, d, k = 2, 3, 5
    vq = VectorQuantize(
        dim=heads * d, codebook_dim=d, codebook_size=k, heads=heads,
        separate_codebook_per_head=True, decay=0.0,
    )  # fmt: skip
    x = torch.randn(1, 20, heads * d)
    _, indices, _ = vq(x)
    for h in range(heads):  # decay 0: sizes are this batch's counts of head h alone
        counts = torch.bincount(indices[..., h].reshape(-1), minlength=k).float()
        torch.testing.assert_close(vq.cluster_size[h], counts)


@pytest.mark.parametrize("separate", [False, True])
def test_get_output_from_indices_equals_eval_forward_with_heads(separate: bool) -> None:
    vq = VectorQuantize(
        dim=12, codebook_dim=2, heads=4, codebook_size=16, separate_codebook_per_head=separate,
        accept_image_fmap=True, use_cosine_sim=separate,
    )  # fmt: skip
    vq(torch.randn(2, 12, 3, 5))
    vq.eval()
    quantized, indices, _ = vq(torch.randn(2, 12, 3, 5))
    assert indices.shape == (2, 3, 5, 4)
    torch.testing.assert_close(vq.get_output_from_indices(indices), quantized, atol=0, rtol=0)
    assert vq.get_codes_from_indices(indices).shape == (2, 3, 5, 8)


# ---- orthogonal regulariser -----------------------------------------------------------------


def _orthogonal_brute_force(codes: torch.Tensor) -> torch.Tensor:
    n = codes.shape[0]
    total = torch.zeros(())
    for i in range(n):
        for j in range(n):
            cos = F.cosine_similarity(codes[i], codes[j], dim=0)
            total = total + (cos - float(i == j)) ** 2
    return total / n**2


@pytest.mark.parametrize("separate", [False, True])
def test_orthogonal_loss_equals_brute_force(separate: bool) -> None:
    weight = 3.0
    vq = VectorQuantize(
        dim=8, codebook_dim=4, codebook_size=6, heads=2, separate_codebook_per_head=separate,
        orthogonal_reg_weight=weight, commitment_weight=0.0, freeze_codebook=True,
    )  # fmt: skip
    _, _, loss = vq(torch.randn(1, 5, 8))
    books = vq.embed.detach().reshape(-1, 6, 4)
    expected = torch.stack([_orthogonal_brute_force(b) for b in books]).mean()
    torch.testing.assert_close(loss, weight * expected.reshape(1))


def test_orthogonal_loss_active_codes_and_max_codes() -> None:
    vq = VectorQuantize(
        dim=4, codebook_size=32, orthogonal_reg_weight=1.0, orthogonal_reg_active_codes_only=True,
        commitment_weight=0.0, freeze_codebook=True,
    )  # fmt: skip
    x = torch.randn(1, 6, 4)
    _, indices, loss = vq(x)
    active = torch.unique(indices)
    torch.testing.assert_close(loss, _orthogonal_brute_force(vq.embed[active]).reshape(1))
    capped = VectorQuantize(
        dim=4, codebook_size=32, orthogonal_reg_weight=1.0, orthogonal_reg_max_codes=5,
        commitment_weight=0.0, freeze_codebook=True,
    )  # fmt: skip
    capped.load_state_dict(vq.state_dict())
    torch.manual_seed(3)
    _, _, loss = capped(x)
    torch.manual_seed(3)
    picked = torch.randperm(32)[:5]
    torch.testing.assert_close(loss, _orthogonal_brute_force(vq.embed[picked]).reshape(1))


# ---- stochastic codes -----------------------------------------------------------------------


def test_sampling_with_tiny_temperature_is_argmin() -> None:
    vq = VectorQuantize(dim=8, codebook_size=64, stochastic_sample_codes=True, freeze_codebook=True)
    x = torch.randn(4, 50, 8)
    _, sampled, _ = vq(x, sample_codebook_temp=1e-6)
    _, zero_temp, _ = vq(x, sample_codebook_temp=0.0)
    expected = torch.cdist(x.reshape(-1, 8), vq.codebook).argmin(-1).reshape(4, 50)
    assert torch.equal(sampled, expected) and torch.equal(zero_temp, expected)
    _, eval_idx, _ = vq.eval()(x)  # eval never samples
    assert torch.equal(eval_idx, expected)


def test_sampling_follows_softmax_of_negative_distance() -> None:
    temp, draws = 0.7, 20000
    codebook = torch.randn(6, 3)
    x = torch.randn(1, 3)
    probs = torch.softmax(-torch.cdist(x, codebook).pow(2)[0] / temp, dim=0)
    got = nearest_code(x.expand(draws, 3), codebook, temperature=temp)
    freq = torch.bincount(got, minlength=6).float() / draws
    assert (freq - probs).abs().max() < 0.02  # ~4.5 standard errors at 20k draws


def test_cosine_sampling_follows_softmax_of_cosine_distance() -> None:
    temp, draws = 0.5, 20000
    codebook = F.normalize(torch.randn(5, 4), dim=-1)
    x = F.normalize(torch.randn(1, 4), dim=-1)
    probs = torch.softmax(-(2 - 2 * x @ codebook.t())[0] / temp, dim=0)
    got = nearest_code(x.expand(draws, 4), codebook, use_cosine_sim=True, temperature=temp)
    freq = torch.bincount(got, minlength=5).float() / draws
    assert (freq - probs).abs().max() < 0.02


# ---- masks and lens -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"codebook_dim": 3},
        {"heads": 2},
        {"heads": 2, "separate_codebook_per_head": True, "threshold_ema_dead_code": 2.0},
        {"heads": 2, "codebook_dim": 3, "kmeans_init": True},
    ],
)
def test_masked_and_unmasked_runs_agree_on_valid_part(kwargs: dict) -> None:
    masked_vq = VectorQuantize(dim=8, codebook_size=8, decay=0.5, **kwargs)
    plain_vq = copy.deepcopy(masked_vq)
    x = torch.randn(2, 6, 8)
    mask = torch.rand(2, 6) > 0.4
    x[~mask] = 1e3
    torch.manual_seed(1)
    quantized, indices, loss = masked_vq(x, mask=mask)
    torch.manual_seed(1)
    ref_q, ref_idx, ref_loss = plain_vq(x[mask][None])
    assert (indices[~mask] == -1).all() and (quantized[~mask] == 0).all()
    assert torch.equal(indices[mask], ref_idx[0])
    torch.testing.assert_close(quantized[mask], ref_q[0])
    torch.testing.assert_close(loss, ref_loss)
    for name, value in plain_vq.state_dict().items():
        torch.testing.assert_close(masked_vq.state_dict()[name], value, msg=name)


def test_lens_equals_prefix_mask() -> None:
    vq = VectorQuantize(dim=4, codebook_size=8, heads=2, codebook_dim=3)
    twin = copy.deepcopy(vq)
    x, lens = torch.randn(3, 5, 4), torch.tensor([5, 2, 0])
    mask = torch.arange(5)[None] < lens[:, None]
    by_lens, by_mask = vq(x, lens=lens), twin(x, mask=mask)
    for a, b in zip(by_lens, by_mask, strict=True):
        torch.testing.assert_close(a, b)
    assert (by_lens.indices[2] == -1).all()
    with pytest.raises(ValueError, match="lens must be"):
        vq(x, lens=torch.tensor([1, 2]))


# ---- codebook health ------------------------------------------------------------------------


def _distortion(vq: VectorQuantize, x: torch.Tensor) -> float:
    quantized, _, _ = vq.eval()(x)
    return float((quantized - x).pow(2).mean())


def test_kmeans_init_lowers_distortion_versus_random_init() -> None:
    centres = torch.randn(16, 8) * 3
    x = (centres[torch.randint(16, (512,))] + 0.1 * torch.randn(512, 8)).reshape(2, 256, 8)
    random_vq = VectorQuantize(dim=8, codebook_size=16).train()
    kmeans_vq = VectorQuantize(dim=8, codebook_size=16, kmeans_init=True).train()
    random_vq(x)
    kmeans_vq(x)
    assert _distortion(kmeans_vq, x) < 0.25 * _distortion(random_vq, x)


def test_dead_code_expiry_lifts_utilization_of_a_collapsed_codebook() -> None:
    x = torch.randn(4, 256, 8)
    usage = {}
    for threshold in (0.0, 1.0):
        vq = VectorQuantize(dim=8, codebook_size=64, threshold_ema_dead_code=threshold)
        with torch.no_grad():  # collapse: every code at one point far from the data
            vq.embed.copy_(torch.full((64, 8), 5.0) + 0.01 * torch.randn(64, 8))
            vq.embed_avg.copy_(vq.embed)
        for _ in range(5):
            vq(x)
        _, indices, _ = vq.eval()(x)
        usage[threshold] = torch.unique(indices).numel() / 64
    assert usage[0.0] < 0.1 and usage[1.0] > 0.9


def test_zero_and_tiny_inputs_with_heads_give_no_nan() -> None:
    vq = VectorQuantize(
        dim=8, codebook_dim=4, codebook_size=16, heads=2, separate_codebook_per_head=True,
        use_cosine_sim=True,
        threshold_ema_dead_code=1.0, orthogonal_reg_weight=1.0,
    )  # fmt: skip
    x = torch.zeros(2, 4, 8, requires_grad=True)
    quantized, _, loss = vq(x)
    (quantized.sum() + loss.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss).all()
    assert all(torch.isfinite(t).all() for t in vq.state_dict().values())


# ---- compile and autocast -------------------------------------------------------------------


def test_compiled_training_step_matches_eager() -> None:
    vq = VectorQuantize(dim=16, codebook_size=32, threshold_ema_dead_code=0.5)
    twin = copy.deepcopy(vq)
    x = torch.randn(2, 40, 16)

    def step(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = x.clone().requires_grad_(True)
        quantized, indices, loss = module(inputs)
        (quantized.sum() + loss.sum()).backward()
        return indices, inputs.grad

    compiled = torch.compile(vq, backend="aot_eager", fullgraph=True)  # no graph break
    torch.manual_seed(5)
    got_idx, got_grad = step(compiled)
    torch.manual_seed(5)
    ref_idx, ref_grad = step(twin)
    assert torch.equal(got_idx, ref_idx)
    torch.testing.assert_close(got_grad, ref_grad)
    torch.testing.assert_close(vq.cluster_size, twin.cluster_size)


def test_heads_under_bf16_autocast_search_in_float32() -> None:
    vq = VectorQuantize(dim=16, codebook_size=64, heads=2, codebook_dim=8).eval()
    x = torch.randn(2, 30, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = vq.project_in(x).float().reshape(-1, 2, 8)
        _, indices, loss = vq(x)
    books = vq.codebook
    for h in range(2):
        ref = torch.cdist(latents[:, h], books).argmin(-1)
        assert torch.equal(indices[..., h].reshape(-1), ref)
    assert loss.dtype == torch.float32


def test_unit_rows_matches_l2_normalize_value_and_gradient() -> None:
    from src.quantizers.kernels import l2_normalize, unit_rows

    x = torch.cat([torch.randn(6, 5), torch.zeros(1, 5)])
    g = torch.randn(7, 5)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (unit_rows(a) * g).sum().backward()
    (l2_normalize(b) * g).sum().backward()
    torch.testing.assert_close(unit_rows(x), l2_normalize(x))
    torch.testing.assert_close(a.grad, b.grad)
