"""Every registered quantizer treats the input dtype the same way (src/quantizers/float_input.py):
integer tensors are refused with a TypeError naming the class and the fix (they hold codes, not
latents), and fp16 / bf16 latents outside autocast are quantized (projections run in their
weights' dtype) and come back in the input's dtype with the indices of the float32 call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor

from src.models.quantizer_adapter import build_latent_quantizer
from src.quantizers import RandomProjectionQuantizer, ResidualVQ, registered_quantizers

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "quantizer"
LATENT = 32
# rpq yields indices only (no decoder input) and external wraps a user's class: not built here
BOTTLENECKS = sorted(set(registered_quantizers()) - {"rpq", "external"})


def build(name: str) -> torch.nn.Module:
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    torch.manual_seed(0)
    return build_latent_quantizer(config, LATENT).eval()


def tensors(value: Any) -> list[Tensor]:
    """The tensors of an index output (a tensor, or a tuple of per-level tensors)."""
    return [value] if isinstance(value, Tensor) else [t for t in value]


def test_every_registered_quantizer_has_a_config_here() -> None:
    assert BOTTLENECKS and all((CONFIGS / f"{n}.yaml").is_file() for n in BOTTLENECKS)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("name", BOTTLENECKS)
def test_integer_input_is_refused_naming_the_class(name: str, dtype: torch.dtype) -> None:
    quantizer = build(name)
    x = torch.randint(-3, 4, (2, 16, LATENT), dtype=dtype)
    with pytest.raises(TypeError) as info:
        quantizer(x)
    message = str(info.value)
    # the class or the family it extends (BSQ is an LFQ and says "LFQ")
    family = [cls.__name__ for cls in type(quantizer).__mro__]
    assert any(f"{cls} quantizes floating-point latents" in message for cls in family), message
    assert f"got {dtype} input; cast it first" in message


def test_integer_input_to_random_projection_quantizer_is_refused() -> None:
    quantizer = RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4)
    with pytest.raises(TypeError, match="RandomProjectionQuantizer quantizes floating-point"):
        quantizer(torch.ones(2, 5, 8, dtype=torch.long))


def test_integer_input_to_residual_vq_without_projection_is_refused() -> None:
    """The layers work at the input width here (no projection to fail in): before the check an
    int64 map came back 'quantized' without error."""
    quantizer = ResidualVQ(dim=8, codebook_size=16, num_quantizers=2)
    with pytest.raises(TypeError, match=r"ResidualVQ quantizes floating-point latents, got torch"):
        quantizer(torch.ones(2, 5, 8, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", BOTTLENECKS)
def test_half_precision_input_outside_autocast(name: str, dtype: torch.dtype) -> None:
    quantizer = build(name)
    x = torch.randn(2, 16, LATENT).to(dtype)
    out = quantizer(x)
    reference = quantizer(x.float())  # the same (rounded) values in float32
    assert out[0].dtype == dtype, f"{name}: output {out[0].dtype} for {dtype} input"
    assert torch.isfinite(out[0].float()).all()
    for got, expected in zip(tensors(out[1]), tensors(reference[1]), strict=True):
        assert torch.equal(got, expected), f"{name}: indices differ from the float32 call"
