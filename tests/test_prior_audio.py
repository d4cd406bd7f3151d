"""experiment=audio_prior end to end on the 4 committed speech clips: an RVQ speech tokenizer
(5 codebooks) trained 3 steps, then the unconditional delay-pattern prior on its codes writes
WAV samples that the tokenizer decoded, and logs val/nll; mismatched clip lengths are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from src.data.code_cache import CodeCacheError
from src.data.code_datamodule import CodeDataModule
from src.models.prior_io import load_prior
from tests.conftest import compose_config
from tests.helpers import QUICK
from train import train

ASSETS = Path(__file__).parent / "assets" / "audio"
CLIPS = {
    "_target_": "src.data.AudioFolderDataModule",
    "root": str(ASSETS),
    "sample_rate": 8000,
    "segment_seconds": 0.5,
    "eval_segment_seconds": 0.5,
    "val_fraction": 0.25,
    "test_fraction": 0.25,
}


def node(values: dict) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in values.items()) + "}"


@pytest.fixture(scope="module")
def tokenizer_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("audio_tokenizer")
    overrides = [
        *QUICK,
        "experiment=audio_rvq",
        "data=audio_folder",
        f"data.root={ASSETS}",
        "data.sample_rate=8000",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
        "test=false",
        "callbacks.audio_reconstructions=null",
    ]
    train(compose_config("train", overrides, run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


def test_audio_prior_trains_on_rvq_codes_and_writes_wavs(tokenizer_ckpt, tmp_path) -> None:
    overrides = [
        "experiment=audio_prior",
        f"tokenizer_ckpt={tokenizer_ckpt}",
        f"data.data={node(CLIPS)}",
        f"data.codes_dir={tmp_path / 'codes'}",
        "trainer.max_epochs=2",
        "extras.print_config=false",
        "callbacks.model_summary=null",
        "callbacks.prior_samples.num_samples=2",
        "model.net.hidden_size=32",
        "model.net.intermediate_size=32",
        "model.net.num_hidden_layers=1",
        "model.net.num_attention_heads=2",
        "model.net.num_key_value_heads=1",
    ]
    run_dir = tmp_path / "prior"
    metrics = train(compose_config("train", overrides, run_dir))
    assert np.isfinite(metrics["val/nll"]) and np.isfinite(metrics["test/nll"])
    prior = load_prior(run_dir / "checkpoints" / "last.ckpt")
    assert prior.layout.name == "delay" and prior.layout.num_streams == 5
    assert prior.layout.num_classes == 0 and list(prior.hparams.grid) == [100]  # 0.5 s / hop 40
    folders = sorted((run_dir / "samples").iterdir())
    # 2 training clips, one batch per epoch: a sample folder after each epoch's validation
    assert [p.name for p in folders] == ["epoch=000-step=000001", "epoch=001-step=000002"]
    for wav in sorted(folders[-1].glob("sample_*.wav")):
        samples, rate = sf.read(wav)
        assert rate == 8000 and samples.shape == (4000,)  # 100 frames x hop 40
    assert len(list(folders[-1].glob("sample_*.wav"))) == 2


def test_clips_of_different_lengths_are_refused(tokenizer_ckpt, tmp_path) -> None:
    uneven = {**CLIPS, "eval_segment_seconds": 1.0}  # 0.5 s training crops, 1 s eval windows
    datamodule = CodeDataModule(
        str(tokenizer_ckpt), labels=False, codes_dir=str(tmp_path / "c"), data=uneven
    )
    with pytest.raises(CodeCacheError, match=r"grid \[100\], the others \[200\]"):
        datamodule.setup()
