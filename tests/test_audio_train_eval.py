"""train.py / eval.py end to end on the audio tokenizer, with the committed real clips."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import soundfile as sf

from eval import evaluate
from tests.conftest import compose_config
from tests.helpers import QUICK, last_logged, read_metrics_csv, run_script
from train import train

ASSETS = Path(__file__).resolve().parent / "assets" / "audio"
AUDIO = [
    "experiment=audio_fsq",
    "data=audio_folder",
    f"data.root={ASSETS}",
    "data.sample_rate=8000",
    "data.val_fraction=0.25",
    "data.test_fraction=0.25",
    "trainer.max_time=null",
    "model.channels=4",
]
VAL_METRICS = [
    "val/loss",
    "val/recon_loss",
    "val/si_snr",
    "val/mel_distance",
    "val/bitrate_kbps",
    "val/codebook/utilization",
    "val/codebook/perplexity",
    "val/codebook/dead_codes",
    "val/codebook/3/utilization",
]


def test_audio_experiment_trains_and_writes_wavs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_script("train.py", *QUICK, *AUDIO, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics_csv(run_dir)
    for name in [*VAL_METRICS, "test/si_snr", "test/bitrate_kbps"]:
        assert math.isfinite(last_logged(rows, name)), name
    assert last_logged(rows, "val/bitrate_kbps") == pytest.approx(4 * math.log2(1000) * 0.2)
    wavs = sorted((run_dir / "reconstructions").glob("*/clip_*.wav"))
    assert {w.name for w in wavs} >= {"clip_00_input.wav", "clip_00_recon.wav"}
    info = sf.info(str(wavs[0]))
    assert info.samplerate == 8000 and info.channels == 1 and info.frames == 16000
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "reconstructions" in result.stdout


@pytest.mark.slow
def test_eval_reproduces_logged_audio_validation_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_config("train", [*QUICK, *AUDIO, "test=false"], output_dir=run_dir)
    train(cfg)
    logged = read_metrics_csv(run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    eval_cfg = compose_config(
        "eval", [f"ckpt_path={ckpt}", "test=false", "logger=csv"], output_dir=tmp_path / "eval"
    )
    reproduced = evaluate(eval_cfg)
    for name in VAL_METRICS:
        assert reproduced[name] == pytest.approx(last_logged(logged, name), abs=1e-4, rel=1e-5)
