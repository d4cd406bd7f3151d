"""VectorQuantize on (batch, dim, time, height, width) maps equals VectorQuantize on the same
tokens laid out as a (batch, time·height·width, dim) sequence."""

from __future__ import annotations

import pytest
import torch

from src.quantizers import VectorQuantize

B, DIM, T, H, W = 2, 12, 3, 4, 5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("layout", [{"accept_image_fmap": True}, {"accept_3d_fmap": True}])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"codebook_dim": 4},
        {"use_cosine_sim": True, "codebook_dim": 4},
        {"heads": 2, "codebook_dim": 3, "separate_codebook_per_head": True},
    ],
)
def test_video_map_equals_the_token_sequence(layout: dict, kwargs: dict) -> None:
    video_vq = VectorQuantize(dim=DIM, codebook_size=16, **layout, **kwargs)
    video_vq(torch.randn(B, DIM, T, H, W))  # a training step: not the initial codebook
    video_vq.eval()
    seq_vq = VectorQuantize(dim=DIM, codebook_size=16, **kwargs).eval()
    seq_vq.load_state_dict(video_vq.state_dict())

    video = torch.randn(B, DIM, T, H, W)
    tokens = video.movedim(1, -1).reshape(B, T * H * W, DIM)
    quantized, indices, loss = video_vq(video)
    ref_quantized, ref_indices, ref_loss = seq_vq(tokens)

    heads = kwargs.get("heads", 1)
    assert quantized.shape == video.shape
    assert indices.shape == ((B, T, H, W, heads) if heads > 1 else (B, T, H, W))
    assert torch.equal(indices.reshape(ref_indices.shape), ref_indices)
    torch.testing.assert_close(
        quantized.movedim(1, -1).reshape(B, T * H * W, DIM), ref_quantized, rtol=0, atol=0
    )
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(video_vq.get_output_from_indices(indices), quantized)


def test_video_map_mask_equals_the_sequence_mask() -> None:
    video_vq = VectorQuantize(dim=DIM, codebook_size=16, accept_3d_fmap=True).eval()
    seq_vq = VectorQuantize(dim=DIM, codebook_size=16).eval()
    seq_vq.load_state_dict(video_vq.state_dict())
    video = torch.randn(B, DIM, T, H, W)
    mask = torch.rand(B, T, H, W) > 0.3
    quantized, indices, loss = video_vq(video, mask=mask)
    tokens = video.movedim(1, -1).reshape(B, -1, DIM)
    ref_quantized, ref_indices, ref_loss = seq_vq(tokens, mask=mask.reshape(B, -1))
    assert torch.equal(indices.reshape(B, -1), ref_indices)
    assert (indices[~mask] == -1).all()
    assert torch.equal(quantized.movedim(1, -1).reshape(B, -1, DIM), ref_quantized)
    torch.testing.assert_close(loss, ref_loss)
