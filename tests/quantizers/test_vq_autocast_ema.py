"""VectorQuantize training under bf16 / fp16 CPU autocast: the EMA state stays float32 and
equals a float32 brute-force EMA step on the same (projected) latents."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src.quantizers import VectorQuantize

DIM, CODEBOOK_DIM, CODES, DECAY, EPS = 16, 8, 24, 0.8, 1e-5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _reference_ema_step(
    state: dict[str, torch.Tensor], latents: torch.Tensor, cosine: bool
) -> dict[str, torch.Tensor]:
    """One EMA step in float32 by brute force: one-hot assignment to the nearest code."""
    embed = state["embed"]
    if cosine:
        latents = F.normalize(latents, dim=-1)
        nearest = (latents @ F.normalize(embed, dim=-1).t()).argmax(dim=-1)
    else:
        nearest = (latents[:, None, :] - embed[None]).pow(2).sum(-1).argmin(dim=-1)
    one_hot = F.one_hot(nearest, CODES).double()
    size = DECAY * state["cluster_size"].double() + (1 - DECAY) * one_hot.sum(0)
    avg = DECAY * state["embed_avg"].double() + (1 - DECAY) * one_hot.t() @ latents.double()
    total = size.sum()
    new_embed = avg / ((size + EPS) / (total + CODES * EPS) * total)[:, None]
    if cosine:
        new_embed = F.normalize(new_embed, dim=-1)
    return {
        "embed": new_embed.float(),
        "cluster_size": size.float(),
        "embed_avg": avg.float(),
        "indices": nearest,
    }


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ema_state_is_float32_and_equals_brute_force_under_autocast(
    dtype: torch.dtype, cosine: bool
) -> None:
    """fp16 autocast is supported on CPU in torch 2.11, so both dtypes run under autocast;
    codebook_dim != dim, so project_in runs in the low precision and the latents are lossy."""
    vq = VectorQuantize(
        dim=DIM,
        codebook_size=CODES,
        codebook_dim=CODEBOOK_DIM,
        decay=DECAY,
        eps=EPS,
        use_cosine_sim=cosine,
    )
    vq.train()
    for _ in range(3):
        x = torch.randn(2, 50, DIM)
        state = {k: v.detach().clone() for k, v in vq.state_dict().items()}
        with torch.autocast("cpu", dtype=dtype):
            projected = vq.project_in(x.reshape(-1, DIM))
            assert projected.dtype == dtype  # autocast is really on
            quantized, indices, loss = vq(x)
            (quantized.float().sum() + loss.sum()).backward()
        expected = _reference_ema_step(state, projected.detach().float(), cosine)
        assert torch.equal(indices.reshape(-1), expected["indices"])
        for name in ("embed", "cluster_size", "embed_avg"):
            value = getattr(vq, name)
            assert value.dtype == torch.float32, name
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5, msg=name)
        assert loss.dtype == torch.float32
