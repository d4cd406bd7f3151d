"""AudioTokenizer: shapes, causality, bitrate, and every bottleneck quantizer trains a few steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from src.models.audio_tokenizer import AudioTokenizer
from src.models.conv1d import ConvDecoder1d, ConvEncoder1d
from src.quantizers import quantizer_class, registered_quantizers
from tests.conftest import compose_config
from tests.models.test_audio_losses import speechlike

SMALL = {"latent_dim": 16, "channels": 4, "strides": [2, 5], "dilations": [1]}

# Quantizers that return only indices (e.g. the random-projection quantizer of BEST-RQ) cannot
# sit between an encoder and a decoder: nothing would be decoded.
BOTTLENECKS = [
    name
    for name in registered_quantizers()
    if getattr(quantizer_class(name), "produces_quantized", True)
]


def test_encoder_hop_and_decoder_length() -> None:
    encoder = ConvEncoder1d(1, 8, channels=4, strides=[2, 4, 5, 8])
    decoder = ConvDecoder1d(1, 8, channels=4, strides=[2, 4, 5, 8])
    latents = encoder(torch.randn(2, 1, 3200))
    assert encoder.hop == 320 and latents.shape == (2, 8, 10)
    assert decoder(latents).shape == (2, 1, 3200)


def test_causal_model_output_ignores_later_samples() -> None:
    encoder = ConvEncoder1d(1, 8, channels=4, strides=[2, 4], causal=True)
    decoder = ConvDecoder1d(1, 8, channels=4, strides=[2, 4], causal=True)
    x = torch.randn(1, 1, 800)
    changed = x.clone()
    changed[..., 400:] = torch.randn(400)
    with torch.no_grad():
        same = decoder(encoder(x))[..., :400], decoder(encoder(changed))[..., :400]
    torch.testing.assert_close(*same)


def test_any_length_round_trips_and_bitrate_follows_the_hop() -> None:
    model = AudioTokenizer({"name": "fsq", "levels": [8, 5, 5, 5]}, 8000, **SMALL)
    reconstructions, quantized = model(torch.randn(2, 1, 1234) * 0.1)
    assert reconstructions.shape == (2, 1, 1234)
    assert quantized.latents.shape == (2, 16, math.ceil(1234 / 10))
    assert model.frame_rate == 800
    assert model.bitrate_kbps == pytest.approx(math.log2(1000) * 800 / 1000)


def test_rejects_a_batch_that_is_not_mono_waveforms() -> None:
    model = AudioTokenizer({"name": "fsq", "levels": [8, 5, 5, 5]}, 8000, **SMALL)
    with pytest.raises(ValueError, match=r"\(batch, 1, samples\)"):
        model(torch.randn(2, 1000))


def quantizer_config(name: str, tmp_path: Path) -> dict:
    cfg = compose_config("train", [f"quantizer={name}"], output_dir=tmp_path)
    return OmegaConf.to_container(cfg.quantizer, resolve=True)


@pytest.mark.parametrize("name", BOTTLENECKS)
def test_every_bottleneck_quantizer_trains_a_few_steps(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AudioTokenizer(quantizer_config(name, tmp_path), 8000, **SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = speechlike(batch=4, samples=2000)
    losses = []
    for _ in range(3):
        out = model.shared_step(batch, "train")
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert out["reconstructions"].shape == batch.shape
    usage = model.metrics_for("train")["codebook"].compute()
    assert 0 < usage["utilization"].item() <= 1
