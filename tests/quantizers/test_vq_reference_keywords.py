"""VectorQuantize's newer reference keywords (issue 17): top-k, per-call EMA control,
manual EMA, DiVeQ, Gumbel straight-through, gradient routing, synchronous update, affine
codebook, bridge, in-place optimizer, cross-entropy commitment, codebook diversity, masked
padding and the loss breakdown. Values are checked against brute-force formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src.quantizers import VectorQuantize

DIM = 16


def _pair(**kwargs: object) -> tuple[VectorQuantize, VectorQuantize]:
    torch.manual_seed(0)
    a = VectorQuantize(dim=DIM, codebook_size=32, **kwargs)
    b = VectorQuantize(dim=DIM, codebook_size=32, **kwargs)
    b.load_state_dict(a.state_dict())
    return a, b


def test_topk_returns_the_k_nearest_codes_in_order_with_per_token_losses() -> None:
    vq = VectorQuantize(dim=DIM, codebook_size=32, commitment_weight=0.5).eval()
    x = torch.randn(2, 7, DIM)
    quantized, indices, loss = vq(x, topk=4)
    assert quantized.shape == (2, 7, 4, DIM) and indices.shape == loss.shape == (2, 7, 4)
    dist = torch.cdist(x.reshape(-1, DIM), vq.codebook)
    expected = dist.argsort(dim=-1)[:, :4].reshape(2, 7, 4)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(quantized, vq.codebook[indices])
    per_token = (vq.codebook[indices] - x.unsqueeze(2)).pow(2).mean(-1)
    torch.testing.assert_close(loss, 0.5 * per_token)
    # channel-first maps put the k axis last, as the reference does
    maps = VectorQuantize(dim=DIM, codebook_size=32, accept_image_fmap=True).eval()
    q, i, _ = maps(torch.randn(2, DIM, 3, 5), topk=2)
    assert q.shape == (2, DIM, 3, 5, 2) and i.shape == (2, 3, 5, 2)


def test_top1_equals_the_plain_call_and_update_indices_replays_its_ema_step() -> None:
    """The reference's test_topk_and_manual_ema_update, at our sizes."""
    plain, topk = _pair()
    x = torch.randn(1, 64, DIM)
    mask = torch.rand(1, 64) > 0.3
    q1, i1, l1 = plain.train()(x, mask=mask)
    q2, i2, l2 = topk.train()(x, mask=mask, topk=1, ema_update=False)
    torch.testing.assert_close(l1.reshape(()), l2.sum() / mask.sum())
    assert torch.equal(i1, i2[..., 0])
    torch.testing.assert_close(q1, q2[..., 0, :])
    assert not torch.equal(plain.embed_avg, topk.embed_avg)  # top-k left the codebook alone
    topk.update_ema_indices(x, i2[..., 0], mask=mask)
    torch.testing.assert_close(topk._codebook.cluster_size, plain.cluster_size)
    torch.testing.assert_close(topk.embed_avg, plain.embed_avg)
    torch.testing.assert_close(topk.codebook, plain.codebook)


def test_ema_update_false_for_one_call_and_per_code_weights() -> None:
    a, b = _pair()
    x = torch.randn(2, 20, DIM)
    before = b.embed.clone()
    b.train()(x, ema_update=False)
    assert torch.equal(b.embed, before) and torch.equal(b.embed_avg, a.embed_avg)
    a, b = _pair()
    weights = (torch.arange(32) % 2).float()
    b.train()(x, ema_update_weight=weights)
    untouched = weights == 0
    torch.testing.assert_close(b.embed_avg[untouched], a.embed_avg[untouched])
    a.train()(x)  # weight 1 codes take the plain EMA step
    touched = ~untouched
    torch.testing.assert_close(b.cluster_size[touched], a.cluster_size[touched])
    torch.testing.assert_close(b.embed_avg[touched], a.embed_avg[touched])
    # a function of the summed vectors and counts gives the same weights
    c, d = _pair()
    c.train()(x, ema_update_weight=weights)
    d.train()(x, ema_update_weight=lambda sums, counts: weights.expand_as(counts))
    torch.testing.assert_close(c.embed, d.embed)
    with pytest.raises(ValueError, match="ema_update_weight"):
        c(x, ema_update_weight=torch.ones(5))


def test_accumulated_statistics_fold_into_the_next_update() -> None:
    a, b = _pair()
    x1, x2 = torch.randn(2, 20, DIM), torch.randn(2, 20, DIM)
    before = b.embed.clone()
    b.train()(x1, accum_ema_update=True)
    assert torch.equal(b.embed, before)
    b(x2)  # folds x1's statistics into this step
    a.eval()
    _, idx1, _ = a(x1)
    _, idx2, _ = a(x2)
    both = torch.cat([x1, x2], dim=1)
    a.update_indices(both, torch.cat([idx1, idx2], dim=1))
    torch.testing.assert_close(b.embed_avg, a.embed_avg)
    torch.testing.assert_close(b.embed, a.embed)


def test_manual_ema_update_moves_statistics_and_waits_for_update_ema() -> None:
    auto, manual = _pair()
    manual.manual_ema_update = True
    x = torch.randn(2, 20, DIM)
    before = manual.embed.clone()
    auto.train()(x)
    manual.train()(x)
    assert torch.equal(manual.embed, before)
    torch.testing.assert_close(manual.embed_avg, auto.embed_avg)
    manual.update_ema()
    torch.testing.assert_close(manual.embed, auto.embed)


def test_directional_reparam_gives_the_code_with_gradients_to_input_and_codebook() -> None:
    vq = VectorQuantize(
        dim=DIM,
        codebook_size=32,
        directional_reparam=True,
        directional_reparam_variance=0.0,
        threshold_ema_dead_code=2,
    )
    assert vq.learnable_codebook and not vq.ema_update and not vq.rotation_trick
    x = torch.randn(2, 9, DIM, requires_grad=True)
    codebook = vq.codebook.detach().clone()  # dead-code revival may change it after the call
    quantized, indices, _ = vq.train()(x)
    torch.testing.assert_close(quantized, codebook[indices], rtol=0, atol=1e-5)
    quantized.square().sum().backward()
    assert x.grad.abs().sum() > 0 and vq.embed.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="threshold_ema_dead_code"):
        VectorQuantize(dim=DIM, codebook_size=8, directional_reparam=True)


def test_route_gradients_to_input_false_and_sync_update_v() -> None:
    vq = VectorQuantize(dim=DIM, codebook_size=32, route_gradients_to_input=False)
    x = torch.randn(2, 9, DIM, requires_grad=True)
    quantized, _, _ = vq.train()(x)
    assert not quantized.requires_grad  # the commitment loss alone reaches x
    v = 0.5
    vq = VectorQuantize(
        dim=DIM,
        codebook_size=32,
        learnable_codebook=True,
        ema_update=False,
        sync_update_v=v,
        rotation_trick=False,
    )
    x = torch.randn(2, 9, DIM, requires_grad=True)
    quantized, indices, _ = vq.train()(x)
    torch.testing.assert_close(quantized, vq.codebook[indices].detach())
    quantized.sum().backward()
    counts = torch.bincount(indices.flatten(), minlength=32).float()
    torch.testing.assert_close(vq.embed.grad, v * counts[:, None].expand(-1, DIM))
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_straight_through_gumbel_sends_gradients_through_code_probabilities() -> None:
    vq = VectorQuantize(
        dim=DIM,
        codebook_size=32,
        straight_through=True,
        stochastic_sample_codes=True,
        sample_codebook_temp=0.7,
    )
    assert not vq.rotation_trick
    x = torch.randn(2, 9, DIM, requires_grad=True)
    grad_out = torch.randn(2, 9, DIM)
    codebook = vq.codebook.clone()  # the EMA step moves it after the call
    quantized, indices, _ = vq.train()(x)
    torch.testing.assert_close(quantized, codebook[indices])
    (quantized * grad_out).sum().backward()
    # the gradient of the soft codes softmax(-|x - c| / T) @ C, brute force
    x2 = x.detach().clone().requires_grad_()
    probs = (-torch.cdist(x2.reshape(-1, DIM), codebook) / 0.7).softmax(-1)
    ((probs @ codebook).reshape_as(x2) * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    with pytest.raises(ValueError, match="at most one"):
        VectorQuantize(dim=DIM, codebook_size=8, straight_through=True, rotation_trick=True)


def test_cross_entropy_commitment_and_diversity_equal_brute_force() -> None:
    vq = VectorQuantize(
        dim=DIM,
        codebook_size=32,
        commitment_use_cross_entropy_loss=True,
        codebook_diversity_loss_weight=0.3,
        codebook_diversity_temperature=2.0,
    )
    x = torch.randn(3, 11, DIM)
    mask = torch.rand(3, 11) > 0.2
    codebook = vq.codebook.clone()
    _, indices, loss, parts = vq.train()(x, mask=mask, return_loss_breakdown=True)
    logits = -torch.cdist(x[mask], codebook)
    ce = F.cross_entropy(logits, indices[mask])
    torch.testing.assert_close(parts.commitment, ce)
    avg = (logits * 2.0).softmax(-1).mean(0)
    entropy = -(avg * avg.clamp_min(1e-5).log()).sum()
    torch.testing.assert_close(parts.codebook_diversity, -entropy)
    torch.testing.assert_close(loss.reshape(()), ce + 0.3 * -entropy)


def test_cross_entropy_against_given_indices() -> None:
    vq = VectorQuantize(dim=DIM, codebook_size=32).eval()
    x = torch.randn(2, 9, DIM)
    target = torch.randint(0, 32, (2, 9))
    target[0, 0] = -1
    quantized, ce = vq(x, indices=target)
    logits = -torch.cdist(x.reshape(-1, DIM), vq.codebook)
    flat = target.reshape(-1)
    torch.testing.assert_close(ce, F.cross_entropy(logits, flat, ignore_index=-1))
    assert quantized.shape == x.shape


def test_masked_padding_zero_or_the_input_and_layernorm_after_project_in() -> None:
    vq = VectorQuantize(
        dim=DIM,
        codebook_size=32,
        codebook_dim=4,
        layernorm_after_project_in=True,
        return_zeros_for_masked_padding=False,
    )
    assert isinstance(vq.project_in_norm, torch.nn.LayerNorm)
    x = torch.randn(2, 9, DIM)
    lens = torch.tensor([4, 9])
    quantized, indices, _ = vq.eval()(x, lens=lens)
    assert torch.equal(quantized[0, 4:], x[0, 4:]) and bool((indices[0, 4:] == -1).all())
    latents = vq.project_in_norm(vq.project_in(x[1]))
    expected = torch.cdist(latents, vq.codebook).argmin(-1)
    assert torch.equal(indices[1], expected)
    zeros = VectorQuantize(dim=DIM, codebook_size=32).eval()
    out, _, _ = zeros(x, lens=lens)
    assert bool((out[0, 4:] == 0).all())


def test_affine_codebook_moments_float32_and_eval_leaves_them() -> None:
    vq = VectorQuantize(dim=DIM, codebook_size=32, affine_param=True)
    x = torch.randn(4, 50, DIM) * 3 + 2
    books = vq.codebook.clone()  # the moments are taken before this step's EMA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vq.train()(x)
    affine = vq.affine
    assert affine.batch_mean.dtype == torch.float32
    torch.testing.assert_close(affine.batch_mean[0, 0], x.reshape(-1, DIM).mean(0))
    torch.testing.assert_close(affine.codebook_mean[0, 0], books.mean(0))
    state = {k: v.clone() for k, v in affine.state_dict().items()}
    vq.eval()
    quantized, indices, _ = vq(torch.randn(2, 5, DIM))
    assert all(torch.equal(v, affine.state_dict()[k]) for k, v in state.items())
    codebook_std = affine.codebook_variance.clamp_min(1e-5).sqrt()
    batch_std = affine.batch_variance.clamp_min(1e-5).sqrt()
    codes = (vq.codebook - affine.codebook_mean[0]) * (batch_std / codebook_std)[0]
    codes = codes + affine.batch_mean[0]
    torch.testing.assert_close(quantized, codes[indices])
    torch.testing.assert_close(vq.get_output_from_indices(indices), quantized)
    assert vq.half().affine.batch_variance.dtype == torch.float32  # moments stay float32


def test_vq_bridge_and_in_place_optimizer_step() -> None:
    torch.manual_seed(0)
    bridge = torch.nn.Linear(DIM, DIM)
    lr = 0.1
    vq = VectorQuantize(
        dim=DIM,
        codebook_size=32,
        vq_bridge=bridge,
        learnable_codebook=True,
        ema_update=False,
        in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=lr),
    )
    x = torch.randn(2, 9, DIM)
    embed = vq.embed.detach().clone().requires_grad_()
    weight = bridge.weight.detach().clone().requires_grad_()
    bias = bridge.bias.detach().clone().requires_grad_()
    codes = embed @ weight.t() + bias
    chosen = torch.cdist(x.reshape(-1, DIM), codes.detach()).argmin(-1)
    F.mse_loss(codes[chosen], x.reshape(-1, DIM)).backward()
    quantized, indices, _, parts = vq.train()(x, return_loss_breakdown=True)
    torch.testing.assert_close(vq.embed.detach(), embed.detach() - lr * embed.grad)
    torch.testing.assert_close(bridge.weight.detach(), weight.detach() - lr * weight.grad)
    assert parts.inplace_optimize > 0
    torch.testing.assert_close(quantized, bridge(vq.codebook)[indices].detach(), rtol=0, atol=1e-5)


def test_loss_breakdown_sums_to_the_loss() -> None:
    vq = VectorQuantize(dim=DIM, codebook_size=32, commitment_weight=0.25, orthogonal_reg_weight=2)
    _, _, loss, parts = vq.train()(torch.randn(2, 9, DIM), return_loss_breakdown=True)
    expected = 0.25 * parts.commitment + 2 * parts.orthogonal_reg
    # learnable (ortho) codebook: + the codebook term, equal in value to the commitment
    torch.testing.assert_close(loss.reshape(()), expected + parts.commitment)
