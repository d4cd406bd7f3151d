"""ResidualVQ training with a mask equals training on the valid tokens alone: indices, outputs,
per-depth losses and the codebook state after each step (projection, k-means, dead codes)."""

from __future__ import annotations

import copy

import pytest
import torch

from src.quantizers import ResidualVQ

DIM, CODEBOOK_DIM = 12, 6
THRESHOLD = 2.5  # not an integer: only revival sets a cluster size to exactly this
TRAINING = {"kmeans_init": True, "kmeans_iters": 3, "threshold_ema_dead_code": THRESHOLD}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(
    "kwargs", [{}, {"shared_codebook": True}, {"use_cosine_sim": True}, {"decay": 0.5}]
)
def test_masked_training_equals_training_on_the_valid_tokens(kwargs: dict) -> None:
    masked_rvq = ResidualVQ(
        dim=DIM,
        codebook_dim=CODEBOOK_DIM,
        num_quantizers=3,
        codebook_size=32,
        **TRAINING,
        **kwargs,
    )
    plain_rvq = copy.deepcopy(masked_rvq)
    masked_rvq.train()
    plain_rvq.train()
    revived = 0
    for step in range(3):
        x = torch.randn(3, 30, DIM) * 2
        mask = torch.rand(3, 30) > 0.35
        x[~mask] = 1e3  # garbage at masked positions must not leak anywhere
        torch.manual_seed(10 + step)  # k-means and dead-code draws: the same stream for both
        quantized, indices, loss = masked_rvq(x, mask=mask)
        torch.manual_seed(10 + step)
        ref_quantized, ref_indices, ref_loss = plain_rvq(x[mask][None])

        assert (indices[~mask] == -1).all() and (quantized[~mask] == 0).all()
        assert torch.equal(indices[mask], ref_indices[0])
        torch.testing.assert_close(quantized[mask], ref_quantized[0])
        torch.testing.assert_close(loss, ref_loss)
        for name, value in plain_rvq.state_dict().items():
            torch.testing.assert_close(masked_rvq.state_dict()[name], value, msg=name)
        revived += sum(int((layer.cluster_size == THRESHOLD).sum()) for layer in masked_rvq.layers)
    assert all(bool(layer.initted) for layer in masked_rvq.layers)
    assert revived > 0, "no dead code was revived: the case does not test expiry"
