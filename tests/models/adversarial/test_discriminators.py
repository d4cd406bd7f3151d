"""Discriminator heads: what each sees (complex STFT, period folds) and PatchGAN's patch grid."""

from __future__ import annotations

import pytest
import torch

from src.models.adversarial.discriminators import (
    Discriminators,
    MultiPeriodDiscriminator,
    MultiScaleSTFTDiscriminator,
    PatchGAN,
)


def test_patchgan_scores_a_grid_of_patches_each_from_its_own_receptive_field() -> None:
    torch.manual_seed(0)
    disc = PatchGAN(1, channels=8, num_layers=2, norm="none")  # norms would mix positions
    images = torch.randn(2, 1, 28, 28)
    ((logits, features),) = disc(images)
    assert logits.shape == (2, 1, 5, 5) and len(features) == 3
    # a pixel change in the top-left corner leaves the bottom-right patch's score unchanged
    changed = images.clone()
    changed[:, :, 0, 0] += 5
    ((other, _),) = disc(changed)
    assert not torch.equal(other[:, :, 0, 0], logits[:, :, 0, 0])
    assert torch.equal(other[:, :, -1, -1], logits[:, :, -1, -1])


def test_msstft_first_layer_sees_real_and_imaginary_parts_of_torch_stft() -> None:
    torch.manual_seed(0)
    disc = MultiScaleSTFTDiscriminator(n_ffts=(64, 32), channels=4, dilations=(1,))
    wave = torch.randn(2, 1, 400)
    heads = disc(wave)
    assert len(heads) == 2
    scale = disc.scales[0]
    spec = torch.stft(wave.squeeze(1), 64, 16, window=torch.hann_window(64), return_complex=True)
    x = torch.stack([spec.real, spec.imag], dim=1).transpose(2, 3)  # (B, 2, time, freq)
    expected = torch.nn.functional.leaky_relu(scale.convs[0](x), 0.2)
    assert torch.allclose(heads[0][1][0], expected, atol=1e-5)


def test_mpd_folds_the_waveform_by_its_period() -> None:
    torch.manual_seed(0)
    disc = MultiPeriodDiscriminator(periods=(3,), channels=(4,))
    wave = torch.randn(1, 1, 30)
    ((logits, features),) = disc(wave)
    folded = wave.view(1, 1, 10, 3)  # 30 samples = 10 frames of period 3, no padding needed
    conv = disc.periods[0].convs[0]
    expected = torch.nn.functional.leaky_relu(conv(folded), 0.1)
    assert torch.allclose(features[0], expected, atol=1e-6)
    assert logits.shape[-1] == 3  # one column per phase of the period


def test_discriminators_concatenate_heads_and_refuse_unknown_names() -> None:
    both = Discriminators(
        [{"name": "msstft", "n_ffts": [64], "channels": 4}, {"name": "mpd", "periods": [2, 3]}], 1
    )
    assert len(both(torch.randn(1, 1, 256))) == 3
    with pytest.raises(ValueError, match="unknown discriminator 'stylegan'"):
        Discriminators([{"name": "stylegan"}], 1)
    with pytest.raises(ValueError, match="norm must be one of"):
        PatchGAN(1, norm="layer")
