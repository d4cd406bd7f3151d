"""VectorQuantize: shapes of the guide's examples, EMA/k-means/dead-code state, estimators."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import src.quantizers.vector_quantize as vq_module
from src.quantizers import (
    UnknownQuantizerError,
    VectorQuantize,
    VQOutput,
    build_quantizer,
    install_communicator,
    quantizer_class,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _snapshot(vq: VectorQuantize) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vq.state_dict().items()}


# ---- shapes and layouts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"codebook_size": 512, "decay": 0.8, "commitment_weight": 1.0},
        {"codebook_size": 256, "codebook_dim": 16},
        {"codebook_size": 256, "use_cosine_sim": True},
        {"codebook_size": 512, "threshold_ema_dead_code": 2},
        {"codebook_size": 256, "kmeans_init": True, "kmeans_iters": 2},
    ],
)
def test_guide_sequence_examples(kwargs: dict) -> None:
    vq = VectorQuantize(dim=256, **kwargs)
    out = vq(torch.randn(1, 1024, 256))
    assert isinstance(out, VQOutput)
    quantized, indices, loss = out
    assert quantized.shape == (1, 1024, 256)
    assert indices.shape == (1, 1024) and indices.dtype == torch.int64
    assert loss.shape == (1,)
    assert torch.isfinite(quantized).all() and torch.isfinite(loss).all()


def test_guide_image_fmap_and_video() -> None:
    vq = VectorQuantize(dim=256, codebook_size=256, accept_image_fmap=True)
    quantized, indices, loss = vq(torch.randn(1, 256, 32, 32))
    assert (quantized.shape, indices.shape, loss.shape) == ((1, 256, 32, 32), (1, 32, 32), (1,))
    quantized, indices, _ = vq(torch.randn(2, 256, 3, 4, 5))
    assert (quantized.shape, indices.shape) == ((2, 256, 3, 4, 5), (2, 3, 4, 5))


def test_channel_first_sequences() -> None:
    vq = VectorQuantize(dim=8, codebook_size=16, channel_last=False).eval()
    x = torch.randn(2, 8, 5)
    quantized, indices, _ = vq(x)
    ref = copy.deepcopy(vq)
    ref.channel_last = True
    expected, expected_idx, _ = ref(x.transpose(1, 2))
    assert torch.equal(indices, expected_idx)
    assert torch.equal(quantized, expected.transpose(1, 2))


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({}, (2, 3)),
        ({}, (2, 3, 7)),
        ({"channel_last": False}, (2, 3, 8)),
        ({"accept_image_fmap": True}, (2, 5, 8)),
        ({"accept_image_fmap": True}, (2, 7, 4, 4)),
    ],
)
def test_bad_input_layout_is_a_clear_error(kwargs: dict, shape: tuple[int, ...]) -> None:
    vq = VectorQuantize(dim=8, codebook_size=4, **kwargs)
    with pytest.raises(ValueError, match=r"expects \(batch, ") as err:
        vq(torch.randn(*shape))
    assert "dim=8" in str(err.value) and str(shape) in str(err.value)
    if not kwargs:
        assert "accept_image_fmap=True" in str(err.value)


def test_bad_mask_shape_is_a_clear_error() -> None:
    vq = VectorQuantize(dim=8, codebook_size=4)
    with pytest.raises(ValueError, match="mask must have the indices' shape"):
        vq(torch.randn(2, 3, 8), mask=torch.ones(2, 4, dtype=torch.bool))


# ---- nearest search -------------------------------------------------------------------------


def test_indices_are_the_float32_nearest_codes_under_bf16_autocast() -> None:
    vq = VectorQuantize(dim=32, codebook_size=128).eval()
    x = torch.randn(2, 100, 32)
    expected = torch.cdist(x.reshape(-1, 32), vq.codebook).argmin(-1).reshape(2, 100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, indices, loss = vq(x)
    assert torch.equal(indices, expected)
    assert loss.dtype == torch.float32


def test_cosine_indices_are_argmax_of_normalised_dot() -> None:
    vq = VectorQuantize(dim=16, codebook_size=64, use_cosine_sim=True).eval()
    x = torch.randn(3, 20, 16)
    sims = F.normalize(x, dim=-1) @ F.normalize(vq.embed, dim=-1).t()
    _, indices, _ = vq(x)
    assert torch.equal(indices, sims.argmax(-1))


# ---- EMA --------------------------------------------------------------------------------------


def test_ema_step_equals_one_hot_reference() -> None:
    decay, eps, k = 0.7, 1e-5, 6
    vq = VectorQuantize(dim=4, codebook_size=k, decay=decay, eps=eps)
    before = _snapshot(vq)
    x = torch.randn(2, 10, 4)
    _, indices, _ = vq(x)
    flat = x.reshape(-1, 4)
    assert torch.equal(indices.reshape(-1), torch.cdist(flat, before["embed"]).argmin(-1))
    one_hot = F.one_hot(indices.reshape(-1), k).float()
    size = decay * before["cluster_size"] + (1 - decay) * one_hot.sum(0)
    avg = decay * before["embed_avg"] + (1 - decay) * one_hot.t() @ flat
    smoothed = (size + eps) / (size.sum() + k * eps) * size.sum()
    torch.testing.assert_close(vq.cluster_size, size)
    torch.testing.assert_close(vq.embed_avg, avg)
    torch.testing.assert_close(vq.embed, avg / smoothed[:, None])
    for name in ("embed", "cluster_size", "embed_avg"):
        assert getattr(vq, name).dtype == torch.float32


@pytest.mark.parametrize("cosine", [False, True])
def test_empty_clusters_and_zero_input_give_no_nan(cosine: bool) -> None:
    vq = VectorQuantize(dim=8, codebook_size=64, use_cosine_sim=cosine, threshold_ema_dead_code=0.5)
    for x in (torch.randn(1, 3, 8), torch.zeros(2, 5, 8), torch.zeros(1, 1, 8)):
        x.requires_grad_(True)
        quantized, _, loss = vq(x)
        (quantized.sum() + loss.sum()).backward()
        assert torch.isfinite(quantized).all() and torch.isfinite(loss).all()
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(t).all() for t in vq.state_dict().values())
    if cosine:
        torch.testing.assert_close(vq.embed.norm(dim=-1), torch.ones(64))


def test_eval_and_frozen_codebook_do_not_change_state() -> None:
    for vq in (
        VectorQuantize(dim=8, codebook_size=16, threshold_ema_dead_code=5).eval(),
        VectorQuantize(dim=8, codebook_size=16, threshold_ema_dead_code=5, freeze_codebook=True),
    ):
        before = _snapshot(vq)
        _, _, loss = vq(torch.randn(2, 7, 8))
        assert loss.item() > 0
        after = _snapshot(vq)
        assert all(torch.equal(before[k], after[k]) for k in before)


# ---- dead codes -----------------------------------------------------------------------------


def _matching_rows(codebook: torch.Tensor, rows: torch.Tensor) -> list[int]:
    """For every code equal to some row, that row's index (-1 where none is equal)."""
    eq = (codebook[:, None, :] == rows[None, :, :]).all(-1)
    return [int(r.nonzero()[0]) if r.any() else -1 for r in eq]


def test_dead_codes_are_replaced_by_distinct_batch_vectors() -> None:
    threshold = 1e6  # every code is dead after one step
    vq = VectorQuantize(dim=4, codebook_size=8, threshold_ema_dead_code=threshold)
    x = torch.randn(2, 16, 4)
    vq(x)
    matched = _matching_rows(vq.embed, x.reshape(-1, 4))
    assert -1 not in matched and len(set(matched)) == 8
    torch.testing.assert_close(vq.cluster_size, torch.full((8,), threshold))
    torch.testing.assert_close(vq.embed_avg, vq.embed * threshold)


def test_more_dead_codes_than_vectors() -> None:
    vq = VectorQuantize(dim=4, codebook_size=16, threshold_ema_dead_code=1e6)
    x = torch.randn(1, 5, 4)
    vq(x)
    matched = _matching_rows(vq.embed, x.reshape(-1, 4))
    replaced = [i for i, m in enumerate(matched) if m >= 0]
    assert len(replaced) == 5 and len({matched[i] for i in replaced}) == 5
    assert (vq.cluster_size[replaced] == 1e6).all()
    assert (vq.cluster_size < 1e6).sum() == 11


# ---- k-means init ---------------------------------------------------------------------------


def test_kmeans_init_finds_cluster_centres_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_kmeans = vq_module.kmeans

    def counting_kmeans(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return real_kmeans(*args, **kwargs)

    monkeypatch.setattr(vq_module, "kmeans", counting_kmeans)
    centres = torch.randn(4, 8) * 10
    x = centres.repeat_interleave(50, 0)
    x = (x + 0.01 * torch.randn_like(x))[torch.randperm(200)].reshape(2, 100, 8)
    vq = VectorQuantize(dim=8, codebook_size=4, kmeans_init=True, kmeans_iters=10)
    assert not vq.initted
    vq(x)
    assert vq.initted and len(calls) == 1
    assert torch.cdist(centres, vq.codebook).min(-1).values.max() < 0.05
    vq(torch.randn(2, 100, 8))
    assert len(calls) == 1


# ---- gradient estimators --------------------------------------------------------------------


def test_rotation_trick_output_is_q_and_gradient_is_rotated() -> None:
    vq = VectorQuantize(dim=6, codebook_size=10, freeze_codebook=True)
    x = torch.randn(2, 5, 6, requires_grad=True)
    quantized, indices, _ = vq(x)
    q = vq.codebook[indices]
    assert torch.equal(quantized, q)
    assert torch.equal(quantized, vq.get_output_from_indices(indices))
    g = torch.randn_like(quantized)
    (quantized * g).sum().backward()
    e, qf, gf = x.detach().reshape(-1, 6), q.reshape(-1, 6), g.reshape(-1, 6)
    u, w = F.normalize(e, dim=-1), F.normalize(qf, dim=-1)
    r = F.normalize(u + w, dim=-1)
    rot = torch.eye(6) - 2 * torch.einsum("ni,nj->nij", r, r) + 2 * torch.einsum("ni,nj->nij", w, u)
    lam = qf.norm(dim=-1) / e.norm(dim=-1)
    expected = lam[:, None] * torch.einsum("nji,nj->ni", rot, gf)  # (λR)ᵀ g
    torch.testing.assert_close(x.grad.reshape(-1, 6), expected)


def test_straight_through_gradient_is_upstream_gradient() -> None:
    vq = VectorQuantize(dim=6, codebook_size=10, rotation_trick=False)
    x = torch.randn(2, 5, 6, requires_grad=True)
    quantized, _, _ = vq(x)
    g = torch.randn_like(quantized)
    (quantized * g).sum().backward()
    assert torch.equal(x.grad, g)


def test_commitment_loss_value() -> None:
    vq = VectorQuantize(dim=6, codebook_size=10, commitment_weight=0.25).eval()
    x = torch.randn(2, 5, 6)
    quantized, _, loss = vq(x)
    torch.testing.assert_close(loss, 0.25 * F.mse_loss(x, quantized).reshape(1))


# ---- decode from indices --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({}, (2, 9, 12)),
        ({"codebook_dim": 4}, (2, 9, 12)),
        ({"use_cosine_sim": True, "codebook_dim": 4}, (2, 9, 12)),
        ({"channel_last": False, "codebook_dim": 4}, (2, 12, 9)),
        ({"accept_image_fmap": True, "codebook_dim": 4}, (2, 12, 3, 5)),
    ],
)
def test_get_output_from_indices_equals_eval_forward(kwargs: dict, shape: tuple) -> None:
    vq = VectorQuantize(dim=12, codebook_size=32, **kwargs)
    vq(torch.randn(*shape))  # one training step, so the EMA state is not the initial one
    vq.eval()
    quantized, indices, _ = vq(torch.randn(*shape))
    torch.testing.assert_close(vq.get_output_from_indices(indices), quantized, atol=0, rtol=0)
    codes = vq.get_codes_from_indices(indices)
    assert codes.shape == (*indices.shape, vq.codebook_dim)


# ---- masks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"kmeans_init": True}, {"threshold_ema_dead_code": 3.0}, {"use_cosine_sim": True}],
)
def test_masked_positions_take_no_part(kwargs: dict) -> None:
    masked_vq = VectorQuantize(dim=4, codebook_size=8, decay=0.5, **kwargs)
    plain_vq = copy.deepcopy(masked_vq)
    x = torch.randn(2, 6, 4)
    mask = torch.rand(2, 6) > 0.4
    mask[0, 0] = False
    x[~mask] = 1e3  # garbage at masked positions must not leak anywhere
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


def test_cosine_fused_path_equals_the_general_path() -> None:
    """No mask takes the one-node cosine path; an all-True mask takes the general one."""
    fused_vq = VectorQuantize(dim=6, codebook_size=16, use_cosine_sim=True, codebook_dim=4)
    general_vq = copy.deepcopy(fused_vq)
    x, g = torch.randn(3, 10, 6), torch.randn(3, 10, 6)
    results = []
    for vq, mask in ((fused_vq, None), (general_vq, torch.ones(3, 10, dtype=torch.bool))):
        leaf = x.clone().requires_grad_(True)
        quantized, indices, loss = vq(leaf, mask=mask)
        ((quantized * g).sum() + 2.0 * loss.sum()).backward()
        results.append(
            (quantized.detach(), indices, loss.detach(), leaf.grad, vq.project_in.weight.grad)
        )
    for fused, general in zip(*results, strict=True):
        torch.testing.assert_close(fused, general, rtol=1e-4, atol=1e-5)


# ---- learnable codebook ---------------------------------------------------------------------


def test_learnable_codebook_is_trained_by_gradient() -> None:
    vq = VectorQuantize(dim=8, codebook_size=16, learnable_codebook=True, ema_update=False)
    assert isinstance(vq.embed, torch.nn.Parameter)
    avg_before = vq.embed_avg.clone()
    x = torch.randn(4, 32, 8)
    optimiser = torch.optim.SGD(vq.parameters(), lr=5.0)
    losses = []
    for _ in range(20):
        optimiser.zero_grad()
        _, _, loss = vq(x)
        loss.sum().backward()
        assert vq.embed.grad is not None and vq.embed.grad.abs().sum() > 0
        optimiser.step()
        losses.append(loss.item())
    assert all(b < a for a, b in itertools.pairwise(losses))
    assert losses[-1] < 0.8 * losses[0]
    assert torch.equal(vq.embed_avg, avg_before)  # no EMA without ema_update


def test_non_learnable_codebook_gets_no_gradient() -> None:
    vq = VectorQuantize(dim=8, codebook_size=16)
    assert not vq.embed.requires_grad
    assert list(vq.parameters()) == []


# ---- communicator and registry --------------------------------------------------------------


class DoublingCommunicator:
    """Pretends there is an identical second rank: sums double; records every call."""

    rank = 0
    world_size = 2

    def __init__(self) -> None:
        self.calls: list[str] = []

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        self.calls.append(f"all_reduce:{op}")
        return tensor * 2

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls.append("all_gather")
        return torch.stack([tensor, tensor])

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self.calls.append(f"broadcast:{src}")
        return tensor.clone()


def test_communicator_installed_after_construction_is_used() -> None:
    decay = 0.8
    vq = VectorQuantize(dim=4, codebook_size=8, decay=decay, kmeans_init=True, kmeans_iters=2)
    comm = DoublingCommunicator()
    assert install_communicator(vq, comm) == 1
    x = torch.randn(1, 30, 4)
    _, indices, _ = vq(x)
    # k-means gathers the ranks' token counts, then their tokens; rank 0's result is broadcast
    assert comm.calls == ["all_gather", "all_gather", "broadcast:0", "all_reduce:sum"]
    # k-means of the union (this batch twice) sets cluster_size to twice this batch's counts,
    # and the EMA step adds the doubled counts again
    counts = torch.bincount(indices.reshape(-1), minlength=8).float()
    torch.testing.assert_close(vq.cluster_size, decay * 2 * counts + (1 - decay) * 2 * counts)


def test_dead_code_replacement_broadcasts() -> None:
    vq = VectorQuantize(dim=4, codebook_size=8, threshold_ema_dead_code=1e6)
    comm = DoublingCommunicator()
    vq.set_communicator(comm)
    vq(torch.randn(1, 30, 4))
    # EMA statistics; the ranks' token counts; rank 0's choice of union rows; the chosen rows
    assert comm.calls == ["all_reduce:sum", "all_gather", "broadcast:0", "all_reduce:sum"]


def test_build_by_name() -> None:
    vq = build_quantizer("vq", dim=8, codebook_size=16)
    assert isinstance(vq, VectorQuantize)
    assert (vq.codebook_size, vq.num_codebooks) == (16, 1)
    assert vq.codebook.shape == (16, 8) and vq.codebook.dtype == torch.float32
    with pytest.raises(UnknownQuantizerError, match="vq"):
        quantizer_class("no-such-quantizer")


def test_half_cast_keeps_codebook_state_float32() -> None:
    vq = VectorQuantize(dim=8, codebook_size=16, codebook_dim=4).to(torch.bfloat16)
    assert vq.project_in.weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in (vq.embed, vq.embed_avg, vq.cluster_size))
    quantized, _, _ = vq(torch.randn(2, 3, 8, dtype=torch.bfloat16))
    assert quantized.dtype == torch.bfloat16


def test_pooled_updates_equal_one_update_on_the_concatenated_batch() -> None:
    pooled = VectorQuantize(dim=4, codebook_size=8, decay=0.5, threshold_ema_dead_code=2.0)
    single = copy.deepcopy(pooled)
    first, second = torch.randn(1, 20, 4), torch.randn(1, 12, 4)
    embed_before = pooled.embed.clone()
    torch.manual_seed(3)
    with pooled.pooled_updates():
        pooled(first)
        assert torch.equal(pooled.embed, embed_before)  # nothing moves inside the block
        pooled(second)
    torch.manual_seed(3)
    single(torch.cat([first, second], dim=1))
    for name, value in single.state_dict().items():
        torch.testing.assert_close(pooled.state_dict()[name], value, msg=name)
