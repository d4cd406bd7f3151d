"""The image tokenizer: layout checks, overfitting a batch, metric names."""

from __future__ import annotations

import itertools

import pytest
import torch

from src.models.image_tokenizer import ImageTokenizer
from src.models.quantizer_adapter import tokens_by_codebook
from src.models.schedules import warmup_cosine_factor
from src.models.tokenizer_module import codebook_log_values

QUANTIZERS = {
    "fsq": {"name": "fsq", "levels": [8, 5, 5, 5]},
    "vq": {"name": "vq", "codebook_size": 64, "codebook_dim": 8, "decay": 0.8},
}


def make_model(quantizer: str, channels: int = 1) -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(
        in_channels=channels, quantizer=QUANTIZERS[quantizer], channels=(16, 32), latent_dim=16
    )


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
def test_loss_goes_down_on_a_fixed_batch(quantizer: str) -> None:
    model = make_model(quantizer)
    model.train()
    images = torch.rand(8, 1, 16, 16).round()  # binary blobs: learnable, not constant
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        reconstructions, quantized = model(images)
        loss = torch.nn.functional.mse_loss(reconstructions, images) + quantized.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize(
    "bad",
    [torch.rand(28, 28), torch.rand(2, 3, 28, 28), torch.rand(2, 1, 29, 29)],
    ids=["rank2", "channels3", "odd_size"],
)
def test_wrong_input_names_expected_layout(bad: torch.Tensor) -> None:
    model = make_model("fsq")
    with pytest.raises(ValueError, match=r"\(batch, channels=1, height, width\)"):
        model(bad)


def test_unknown_recon_loss_lists_choices() -> None:
    with pytest.raises(ValueError, match="mse"):
        ImageTokenizer(in_channels=1, quantizer=QUANTIZERS["fsq"], recon_loss="huber")


def test_quantizer_indices_flatten_to_tokens_by_codebook() -> None:
    indices = torch.arange(2 * 3 * 4).reshape(2, 3, 4)  # (B, N, Q)
    assert tokens_by_codebook(indices, 2, 3).tolist() == indices.reshape(6, 4).tolist()
    grouped = torch.arange(2 * 2 * 3 * 4).reshape(2, 2, 3, 4)  # (G, B, N, Q)
    flat = tokens_by_codebook(grouped, 2, 3)
    assert flat.shape == (6, 8)
    assert flat[4].tolist() == grouped[:, 1, 1].reshape(-1).tolist()  # batch 1, token 1
    with pytest.raises(ValueError, match="expected"):
        tokens_by_codebook(torch.zeros(5, 7), 2, 3)


def test_codebook_log_names_are_stable() -> None:
    usage = {
        "utilization": torch.tensor(0.5),
        "perplexity": torch.tensor(2.0),
        "dead_codes": torch.tensor(1.0),
        "utilization_per_codebook": torch.tensor([0.25, 0.75]),
        "perplexity_per_codebook": torch.tensor([1.0, 3.0]),
        "dead_codes_per_codebook": torch.tensor([3.0, 1.0]),
    }
    values = codebook_log_values("val", usage)
    assert values["val/codebook/utilization"] == 0.5
    assert values["val/codebook/1/utilization"] == 0.75
    assert values["val/codebook/0/dead_codes"] == 3.0
    assert len(values) == 9
    single = {k: v[:1] if v.ndim else v for k, v in usage.items()}
    assert sorted(codebook_log_values("test", single)) == [
        "test/codebook/dead_codes",
        "test/codebook/perplexity",
        "test/codebook/utilization",
    ]


def test_warmup_then_cosine_to_min_ratio() -> None:
    factors = [warmup_cosine_factor(s, 10, 110, 0.1) for s in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.55)
    assert factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
