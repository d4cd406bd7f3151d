"""The audio recipe end to end on the module: MS-STFT + MPD discriminators, least squares,
feature matching and EnCodec's balancer train the tokenizer for a few steps."""

from __future__ import annotations

import torch
from lightning import Trainer
from torch.utils.data import DataLoader, TensorDataset

from src.models.audio_tokenizer import AudioTokenizer

GAN = {
    "discriminators": [
        {"name": "msstft", "n_ffts": [128, 64], "channels": 4, "dilations": [1, 2]},
        {"name": "mpd", "periods": [2, 3], "channels": [4, 8]},
    ],
    "loss": "least_squares",
    "adaptive_weight": False,
    "feature_matching_weight": 1.0,
    "balancer": {
        "weights": dict(waveform=0.1, mel=1.0, stft=1.0, adversarial=3.0, feature_matching=3.0),
        "ema_decay": 0.9,
    },
}


def test_audio_gan_steps_train_both_networks_and_log_the_balancer() -> None:
    torch.manual_seed(0)
    model = AudioTokenizer(
        quantizer={"name": "rvq", "num_quantizers": 2, "codebook_size": 16},
        sample_rate=8000,
        latent_dim=8,
        channels=4,
        strides=(2, 4),
        dilations=(1,),
        mel_n_ffts=(128,),
        mel_n_mels=16,
        stft_fft_sizes=(64,),
        warmup_steps=1,
        adversarial=GAN,
    )
    original = model.shared_step
    model.shared_step = lambda batch, stage: original(batch[0], stage)
    waves = torch.randn(8, 1, 800, generator=torch.Generator().manual_seed(1)) * 0.1
    disc_before = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    trainer = Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        gradient_clip_val=None, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(waves), batch_size=4))
    assert trainer.global_step == 2 and int(model.disc_steps) == 2
    changed = [k for k, v in model.discriminator.state_dict().items()
               if not torch.equal(v, disc_before[k])]  # fmt: skip
    assert changed
    logged = trainer.logged_metrics
    for name in ("g_loss", "d_loss", "feature_matching", "d_acc_real", "d_acc_fake"):
        assert torch.isfinite(logged[f"train/gan/{name}"]), name
    for name in GAN["balancer"]["weights"]:
        assert float(logged[f"train/gan/balancer/{name}_grad_norm"]) > 0, name
    assert "train/gan/adaptive_weight" not in logged  # the balancer replaces it
