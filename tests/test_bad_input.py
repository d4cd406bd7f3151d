"""Bad input, one named probe per case: each must fail early with a message that names the
problem (and usually the fix), or, where the input is merely unusual, behave as documented.

Issue 16 listed the probes of a new user; the cases that need a whole training run live beside
the fault they belong to:
  data=image_folder with every logger       tests/test_every_data_config.py
  model.lr=1e8 (divergence)                 tests/test_divergence.py
  NaN / inf tokens in a batch               tests/quantizers/test_nonfinite_tokens.py
  named run without checkpoints             tests/test_restart.py
  ckpt_path of another quantizer            tests/test_restart.py
  out-of-range indices to decode            tests/quantizers/test_contract.py
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from src.data import (
    AudioFolderDataModule,
    EmbeddedMNISTDataModule,
    EmbeddedPhotosDataModule,
    ImageFolderDataModule,
    TorchvisionImageDataModule,
)
from src.models.quantizer_adapter import build_latent_quantizer
from src.quantizers import FSQ, LFQ, ResidualVQ, UnknownQuantizerError, VectorQuantize
from src.utils.config_checks import check_optimizer_config
from src.utils.resume import ResumeError, explicit_checkpoint
from tests.conftest import compose_config


class Probe(NamedTuple):
    """`call(tmp_path)` must raise `error` with a message matching `message` (a regex)."""

    call: Callable[[Path], Any]
    error: type[BaseException]
    message: str


def _train_cfg(*overrides: str) -> Any:
    return compose_config("train", list(overrides))


def _audio_dir(tmp_path: Path, files: dict[str, int]) -> Path:
    """WAVs of the given sample counts (0 = an empty file)."""
    for name, samples in files.items():
        sf.write(tmp_path / name, np.zeros(samples, dtype=np.float32), 8000)
    return tmp_path


PROBES: dict[str, Probe] = {
    # ---- training settings -----------------------------------------------------------------
    "negative learning rate": Probe(
        lambda tmp: check_optimizer_config(_train_cfg("model.lr=-0.1")),
        ValueError,
        r"model\.lr=-0\.1 is not valid: it must be a positive number, e\.g\. model\.lr=2e-3",
    ),
    "zero learning rate": Probe(
        lambda tmp: check_optimizer_config(_train_cfg("model.lr=0")),
        ValueError,
        r"model\.lr=0 is not valid",
    ),
    "negative weight decay": Probe(
        lambda tmp: check_optimizer_config(_train_cfg("model.weight_decay=-1")),
        ValueError,
        r"model\.weight_decay=-1 is not valid: it must be >= 0",
    ),
    "learning rate not a number": Probe(
        lambda tmp: check_optimizer_config(_train_cfg("model.lr=fast")),
        ValueError,
        r"model\.lr='fast' is not valid",
    ),
    # ---- quantizer config ------------------------------------------------------------------
    "unknown quantizer": Probe(
        lambda tmp: build_latent_quantizer({"name": "vqq"}, 32),
        UnknownQuantizerError,
        r"vqq",
    ),
    "quantizer without a name": Probe(
        lambda tmp: build_latent_quantizer({"codebook_size": 16}, 32),
        ValueError,
        r"quantizer config needs a `name` key",
    ),
    "index-only quantizer as a bottleneck": Probe(
        lambda tmp: build_latent_quantizer({"name": "rpq"}, 32),
        ValueError,
        r"rpq produces only indices.*pick one of:",
    ),
    "quantizer dim differs from the latent width": Probe(
        lambda tmp: build_latent_quantizer({"name": "vq", "dim": 64, "codebook_size": 16}, 32),
        ValueError,
        r"quantizer\.dim=64 differs from the model's latent width model\.latent_dim=32.*"
        r"Drop quantizer\.dim",
    ),
    # ---- quantizer input -------------------------------------------------------------------
    "integer input to VQ": Probe(
        lambda tmp: VectorQuantize(dim=8, codebook_size=16)(torch.ones(2, 5, 8, dtype=torch.long)),
        TypeError,
        r"VectorQuantize quantizes floating-point latents, got torch\.int64 input; cast it",
    ),
    "integer input to FSQ": Probe(
        lambda tmp: FSQ(levels=[8, 5, 5, 5])(torch.ones(2, 5, 4, dtype=torch.int32)),
        TypeError,
        r"FSQ quantizes floating-point latents, got torch\.int32",
    ),
    "integer input to LFQ": Probe(
        lambda tmp: LFQ(dim=8, codebook_size=256)(torch.ones(2, 5, 8, dtype=torch.long)),
        TypeError,
        r"LFQ quantizes floating-point latents, got torch\.int64",
    ),
    "integer input to ResidualVQ": Probe(
        lambda tmp: ResidualVQ(dim=8, codebook_size=16, num_quantizers=2)(
            torch.ones(2, 5, 8, dtype=torch.long)
        ),
        TypeError,
        r"ResidualVQ quantizes floating-point latents, got torch\.int64 input; cast it",
    ),
    "VQ input of the wrong width": Probe(
        lambda tmp: VectorQuantize(dim=8, codebook_size=16)(torch.randn(2, 5, 6)),
        ValueError,
        r"VectorQuantize expects \(batch, seq, dim=8\) input, got shape \(2, 5, 6\)",
    ),
    # ---- data ------------------------------------------------------------------------------
    "image folder that does not exist": Probe(
        lambda tmp: ImageFolderDataModule(str(tmp / "nowhere")).setup(),
        FileNotFoundError,
        r"image folder '.*nowhere' does not exist or is not a directory",
    ),
    "image folder without images": Probe(
        lambda tmp: ImageFolderDataModule(str(tmp)).setup(),
        FileNotFoundError,
        r"no image files with extensions .*\.png.* found in",
    ),
    "image folder of unreadable images": Probe(
        lambda tmp: (
            (tmp / "a.png").write_bytes(b"not a png"),
            ImageFolderDataModule(str(tmp)).setup(),
        ),
        FileNotFoundError,
        r"none of the 1 image files in .* could be read",
    ),
    "two image channels": Probe(
        lambda tmp: ImageFolderDataModule(str(tmp), channels=2),
        ValueError,
        r"channels must be 1 \(grayscale\) or 3 \(RGB\), got 2",
    ),
    "zero image size": Probe(
        lambda tmp: ImageFolderDataModule(str(tmp), image_size=0),
        ValueError,
        r"image_size must be >= 1, got 0",
    ),
    "zero batch size": Probe(
        lambda tmp: EmbeddedMNISTDataModule(batch_size=0),
        ValueError,
        r"batch_size must be >= 1, got 0",
    ),
    "held-out fractions that leave nothing to train": Probe(
        lambda tmp: EmbeddedMNISTDataModule(val_fraction=0.5, test_fraction=0.5).setup(),
        ValueError,
        r"val_fraction \+ test_fraction must be < 1, got 0\.5 \+ 0\.5",
    ),
    "unknown photo": Probe(
        lambda tmp: EmbeddedPhotosDataModule(val_photos=["moon"], test_photos=["chelsea"]),
        ValueError,
        r"unknown photo 'moon'; available:",
    ),
    "unknown torchvision dataset": Probe(
        lambda tmp: TorchvisionImageDataModule(name="ImageNet"),
        ValueError,
        r"unknown torchvision dataset 'ImageNet'; supported: MNIST",
    ),
    "torchvision data missing without download": Probe(
        lambda tmp: TorchvisionImageDataModule(root=str(tmp)).setup(),
        FileNotFoundError,
        r"MNIST was not found under .* Set data\.download=true",
    ),
    "audio folder with only empty files": Probe(
        lambda tmp: AudioFolderDataModule(str(_audio_dir(tmp, {"a.wav": 0}))).setup(),
        FileNotFoundError,
        r"none of the 1 audio files in .* could be read",
    ),
    # ---- checkpoints -----------------------------------------------------------------------
    "ckpt_path that does not exist": Probe(
        lambda tmp: explicit_checkpoint(tmp / "last.ckpt"),
        ResumeError,
        r"ckpt_path=.*last\.ckpt does not load \(FileNotFoundError",
    ),
    "ckpt_path that is not a checkpoint": Probe(
        lambda tmp: (
            (tmp / "notes.ckpt").write_text("hello"),
            explicit_checkpoint(tmp / "notes.ckpt"),
        ),
        ResumeError,
        r"ckpt_path=.*notes\.ckpt does not load",
    ),
}


@pytest.mark.parametrize("name", list(PROBES))
def test_bad_input_fails_early_and_clearly(name: str, tmp_path: Path) -> None:
    probe = PROBES[name]
    with pytest.raises(probe.error) as info:
        probe.call(tmp_path)
    assert re.search(probe.message, str(info.value), flags=re.DOTALL), str(info.value)


# ---- unusual input that is not an error ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "make",
    [
        lambda: FSQ(levels=[8, 5, 5, 5], dim=8),
        lambda: LFQ(dim=8, codebook_size=256),
        lambda: VectorQuantize(dim=8, codebook_size=16, codebook_dim=4),
    ],
    ids=["fsq", "lfq", "vq"],
)
def test_half_precision_input_outside_autocast_computes_in_float32(make, dtype) -> None:
    """fp16/bf16 latents into float32 projections: computed in float32, returned in the input
    dtype, with the indices of the float32 call on the same (rounded) values."""
    quantizer = make().eval()
    x = torch.randn(2, 5, 8).to(dtype)
    out = quantizer(x)
    ref = quantizer(x.float())
    assert out.quantized.dtype == dtype
    assert torch.equal(out.indices, ref.indices)
    # VQ rounds the rotation-trick output to the input dtype before projecting it back
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(out.quantized, ref.quantized.to(dtype), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "make",
    [
        lambda: VectorQuantize(
            dim=8, codebook_size=16, threshold_ema_dead_code=2, kmeans_init=True
        ),
        lambda: ResidualVQ(dim=8, codebook_size=16, num_quantizers=2, threshold_ema_dead_code=2),
    ],
    ids=["vq", "rvq"],
)
def test_empty_batch_gives_zero_loss_and_changes_no_state(make) -> None:
    quantizer = make().train()
    before = {k: v.clone() for k, v in quantizer.state_dict().items()}
    out = quantizer(torch.randn(0, 5, 8))
    assert torch.equal(out.loss, torch.zeros_like(out.loss))
    assert out.quantized.shape == (0, 5, 8) and out.indices.shape[:2] == (0, 5)
    for key, value in quantizer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_home_folder_is_expanded_for_image_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "pictures").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / "pictures" / f"{i}.png")
    dm = ImageFolderDataModule("~/pictures", image_size=8, val_fraction=0.25, test_fraction=0.25)
    assert dm.root == tmp_path / "pictures"
    dm.setup()
    assert sum(len(files) for files in dm.split_files.values()) == 4


def test_empty_wav_is_skipped_as_an_empty_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _audio_dir(tmp_path, {"empty.wav": 0, **{f"{i}.wav": 8000 for i in range(3)}})
    dm = AudioFolderDataModule(str(root), sample_rate=16000, val_fraction=0.3, test_fraction=0.3)
    with caplog.at_level(logging.WARNING, logger="src.data.audio_io"):
        dm.setup()
    messages = [r.getMessage() for r in caplog.records]
    assert f"skipping empty audio file {root / 'empty.wav'}: it holds no samples" in messages
    assert not any("reshape" in m for m in messages)
