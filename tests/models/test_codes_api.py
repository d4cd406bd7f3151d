"""The codes API (src/models/codes_api.py) over every bottleneck quantizer config: after a few
training steps, decode_codes(encode_codes(x)) equals the forward pass exactly and every code
lies in its slot's range; bad codes get clear errors; predict_step tokenizes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from src.models.audio_tokenizer import AudioTokenizer
from src.models.codes_api import CodesError
from src.models.image_tokenizer import ImageTokenizer
from src.models.quantizer_adapter import bottleneck_quantizers

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "quantizer"


def quantizer_config(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    config.pop("defaults", None)  # Hydra's composition list, not a quantizer keyword
    return config


# every config file of a bottleneck quantizer (new registered names are covered by their
# config file; test_contract checks that each registered name has one), plus variants
CASES: dict[str, dict[str, Any]] = {
    path.stem: quantizer_config(path)
    for path in sorted(CONFIGS.glob("*.yaml"))
    if quantizer_config(path)["name"] in bottleneck_quantizers()
}
vq = quantizer_config(CONFIGS / "vq.yaml")
CASES["vq_heads_separate"] = {**vq, "heads": 2, "separate_codebook_per_head": True}
CASES["vq_heads_shared"] = {**vq, "heads": 2, "codebook_dim": 4}
CASES["vq_no_codebook_dim"] = {**vq, "codebook_dim": None, "codebook_size": 64}


def test_cases_cover_every_bottleneck_quantizer() -> None:
    assert {c["name"] for c in CASES.values()} == set(bottleneck_quantizers())


def tiny_image_tokenizer(
    quantizer: dict[str, Any], steps: int = 2, image_size: int = 16
) -> ImageTokenizer:
    """A small ImageTokenizer trained `steps` Adam steps on random square images of
    `image_size` (k-means seeded codebooks cut to 64 codes: k-means++ over 256+ codes dominates
    the test's time)."""
    if quantizer.get("kmeans_init"):
        quantizer = {**quantizer, "codebook_size": min(64, quantizer["codebook_size"])}
    torch.manual_seed(0)
    model = ImageTokenizer(in_channels=1, quantizer=quantizer, channels=(8, 16), latent_dim=8)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        images = torch.rand(8, 1, image_size, image_size)
        reconstructions, quantized = model(images)
        loss = torch.nn.functional.mse_loss(reconstructions, images) + quantized.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_codes_round_trip_equals_forward(case: str) -> None:
    model = tiny_image_tokenizer(CASES[case])
    images = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    codes = model.encode_codes(images)
    q = model.num_codebooks
    assert codes.dtype == torch.int64 and codes.shape == (5, *model.code_grid((16, 16)), q)
    assert model.code_grid(images.shape) == (8, 8) and len(model.codebook_sizes) == q
    sizes = torch.tensor(model.codebook_sizes)
    assert (codes >= 0).all() and (codes < sizes).all()  # every code in its slot's range
    with torch.no_grad():
        reconstructions, quantized = model(images)
    assert torch.equal(model.codes_to_latents(codes), quantized.latents)
    decoded = model.decode_codes(codes)
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, reconstructions.clamp(0, 1))


def test_codes_ignore_training_mode_and_restore_it() -> None:
    """A tokenizer inside a training model still encodes as in eval (no EMA update, no
    quantize dropout) and keeps its submodules' modes."""
    model = tiny_image_tokenizer({**CASES["rvq"], "quantize_dropout": True}, steps=1)
    images = torch.rand(4, 1, 16, 16)
    expected = model.encode_codes(images)
    model.train()
    model.decoder.eval()  # a submodule deliberately frozen by its owner
    state = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    for _ in range(3):
        assert torch.equal(model.encode_codes(images), expected)
    assert model.training and model.encoder.training and not model.decoder.training
    for key, value in model.quantizer.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_bad_codes_are_clear_errors() -> None:
    model = tiny_image_tokenizer({**CASES["grvq"], "kmeans_init": False}, steps=1)  # 4 x 256
    codes = model.encode_codes(torch.rand(2, 1, 16, 16))
    with pytest.raises(CodesError, match=r"\(batch, height, width, Q=4\).*\(2, 8, 8\)"):
        model.decode_codes(codes[..., 0])
    with pytest.raises(CodesError, match=r"Q=4"):
        model.decode_codes(codes[..., :3])
    with pytest.raises(TypeError, match="integer"):
        model.decode_codes(codes.float())
    for bad in (256, -1):
        broken = codes.clone()
        broken[1, 2, 3, 2] = bad
        with pytest.raises(CodesError, match=rf"code slot 2 holds {bad}, outside.*\[0, 256\)"):
            model.decode_codes(broken)
    # smaller integer dtypes (as a code cache stores them) decode the same
    assert torch.equal(model.decode_codes(codes.to(torch.int16)), model.decode_codes(codes))


def test_codes_and_usage_with_a_codebook_size_per_depth() -> None:
    """ResidualVQ(codebook_size=[4, 16, 64]) (no num_quantizers): each code slot has its own
    range in the codes API and its own size in the usage metric."""
    config = {**CASES["rvq"], "num_quantizers": None, "codebook_size": [4, 16, 64]}
    model = tiny_image_tokenizer({**config, "kmeans_init": False})
    assert model.codebook_sizes == (4, 16, 64) and model.num_codebooks == 3
    images = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    codes = model.encode_codes(images)
    assert bool((codes < torch.tensor([4, 16, 64])).all()) and bool((codes >= 0).all())
    with torch.no_grad():
        _, quantized = model(images)
    assert torch.equal(model.codes_to_latents(codes), quantized.latents)
    broken = codes.clone()
    broken[0, 0, 0, 0] = 4  # valid in slots 1 and 2, not in slot 0
    with pytest.raises(CodesError, match=r"code slot 0 holds 4, outside.*\[0, 4\)"):
        model.decode_codes(broken)
    usage = model.codebook_usage("val")
    usage.update(codes.reshape(-1, 3))
    out = usage.compute()
    used = [len(codes[..., q].unique()) for q in range(3)]
    expected = torch.tensor([n / s for n, s in zip(used, (4, 16, 64), strict=True)])
    torch.testing.assert_close(out["utilization_per_codebook"], expected)
    torch.testing.assert_close(
        out["dead_codes_per_codebook"],
        torch.tensor([4.0 - used[0], 16.0 - used[1], 64.0 - used[2]]),
    )


def test_fingerprint_tracks_weights_and_config() -> None:
    model = tiny_image_tokenizer(CASES["fsq"], steps=1)
    first = model.fingerprint
    model.train()
    model.encode_codes(torch.rand(2, 1, 16, 16))
    assert model.fingerprint == first and len(first) == 64  # mode and use leave it alone
    with torch.no_grad():
        next(model.decoder.parameters()).view(-1)[0] += 1e-3
    assert model.fingerprint != first
    other = tiny_image_tokenizer({**CASES["fsq"], "levels": [8, 6, 4]}, steps=1)
    assert other.fingerprint != first


def test_predict_step_tokenizes() -> None:
    model = tiny_image_tokenizer(CASES["fsq"], steps=1)
    images = torch.rand(6, 1, 16, 16)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    batches = trainer.predict(model, DataLoader(images, batch_size=4))
    assert torch.equal(torch.cat(batches), model.encode_codes(images))


def test_audio_codes_round_trip() -> None:
    torch.manual_seed(0)
    model = AudioTokenizer(
        quantizer=CASES["rvq"], sample_rate=8000, latent_dim=8, channels=4, strides=(2, 4)
    ).eval()
    assert model.hop == 8
    waveforms = torch.randn(2, 1, 80) * 0.1
    codes = model.encode_codes(waveforms)
    assert codes.shape == (2, 10, 4) and model.code_grid(waveforms.shape) == (10,)
    assert model.code_grid((81,)) == (11,)
    with torch.no_grad():
        reconstructions, _ = model(waveforms)
    assert torch.equal(model.decode_codes(codes), reconstructions)
    with pytest.raises(CodesError, match=r"\(batch, frames, Q=4\)"):
        model.decode_codes(codes[None])
