"""Benchmark (issue 15): the same test clips through several audio tokenizers, as WAVs.

    python scripts/export_audio_clips.py <out_dir> NAME=<tokenizer.ckpt> [NAME=<ckpt> ...]
        [--clips 0 1] [--threads 1]

Loads the test split of the Allison speech data (configs/data/allison_speech.yaml: 2-s windows
at 8 kHz, split seed 0), writes `<out_dir>/clip_NN_input.wav` once and
`<out_dir>/clip_NN_<NAME>.wav` per checkpoint (16-bit PCM), and prints one markdown row per
checkpoint: SI-SNR (dB, torchmetrics' as the tokenizer logs it) and mel distance (the tokenizer's
own metric) over the whole test split, and per exported clip.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# keep scripts/ off the import path: scripts/tokenize.py would shadow the standard library's
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("ckpts", nargs="+", help="NAME=path/to/tokenizer.ckpt")
    parser.add_argument("--clips", type=int, nargs="+", default=[0, 1], help="test indices")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import soundfile as sf
    from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

    from src.data import AsteriskSpeechDataModule
    from src.models import load_tokenizer

    data = AsteriskSpeechDataModule(segment_seconds=0.5, eval_segment_seconds=2.0, seed=0)
    data.setup("test")
    waves = torch.stack([data.data_test[i] for i in range(len(data.data_test))])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rate = data.sample_rate
    for i in args.clips:
        sf.write(args.out_dir / f"clip_{i:02d}_input.wav", waves[i, 0].numpy(), rate, "PCM_16")
    print("| run | test SI-SNR (dB) | test mel distance | clips: SI-SNR (dB) / mel distance |")
    print("| --- | --- | --- | --- |")
    for spec in args.ckpts:
        name, _, path = spec.partition("=")
        tokenizer = load_tokenizer(path)
        recons = torch.cat([tokenizer(chunk)[0] for chunk in waves.split(16)])
        snr = scale_invariant_signal_noise_ratio(recons[:, 0], waves[:, 0])  # per clip
        mel = tokenizer.mel_distance(recons, waves)
        for i in args.clips:
            wave = recons[i, 0].clamp(-1, 1).numpy()
            sf.write(args.out_dir / f"clip_{i:02d}_{name}.wav", wave, rate, "PCM_16")
        per_clip = ", ".join(f"{snr[i]:.2f} / {mel[i]:.3f}" for i in args.clips)
        print(f"| {name} | {snr.mean():.3f} | {mel.mean():.4f} | {per_clip} |", flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
