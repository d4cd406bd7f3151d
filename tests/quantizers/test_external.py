"""`quantizer=external`: any module returning (quantized, indices[, loss]) as the reference
library does, wrapped for the framework. Checked against the bare vector-quantize-pytorch
modules (same seed, same weights): the wrapper changes the index layout only."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import vector_quantize_pytorch as reference
from torch import Tensor, nn

from src.quantizers import (
    ExternalQuantizer,
    IndexRangeError,
    aux_loss,
    build_quantizer,
    check_contract,
    index_layout,
    index_slots,
)
from src.quantizers.external import ExternalQuantizerError
from tests.conftest import compose_config

DIM = 32
# name -> (target keywords, expected codebook_sizes)
CASES = {
    "VectorQuantize": ({"codebook_size": 64}, (64,)),
    "ResidualVQ": ({"num_quantizers": 4, "codebook_size": 32}, (32,) * 4),
    "GroupedResidualVQ": ({"num_quantizers": 2, "groups": 2, "codebook_size": 16}, (16,) * 4),
    "FSQ": ({"levels": [8, 5, 5, 5]}, (1000,)),
    "LFQ": ({"codebook_size": 256, "num_codebooks": 2}, (256, 256)),
}


def build_pair(name: str) -> tuple[ExternalQuantizer, nn.Module]:
    """The wrapper and the bare module, built from the same seed (so with equal weights)."""
    kwargs, _ = CASES[name]
    torch.manual_seed(0)
    target = f"vector_quantize_pytorch.{name}"
    wrapper = build_quantizer("external", target=target, dim=DIM, **kwargs)
    torch.manual_seed(0)
    bare = getattr(reference, name)(dim=DIM, **kwargs)
    return wrapper, bare


@pytest.mark.parametrize("name", CASES)
def test_wrapper_equals_the_bare_module_and_keeps_the_contract(name: str) -> None:
    wrapper, bare = build_pair(name)
    _, sizes = CASES[name]
    assert check_contract(wrapper) == (max(sizes), len(sizes), sizes, True)
    x = torch.randn(3, 7, DIM)
    for mode in ("train", "eval"):  # training: one EMA / k-means step on both
        out = getattr(wrapper, mode)()(x)
        expected = getattr(bare, mode)()(x)
        torch.testing.assert_close(out.quantized, expected[0], rtol=0, atol=0)
        slots = index_slots(expected[1], index_layout(bare, DIM))
        assert out.indices.dtype == torch.int64 and out.indices.shape == (3, 7, len(sizes))
        assert torch.equal(out.indices, slots.long())
        assert torch.equal(aux_loss(out), aux_loss(tuple(expected)))
        for got, want in zip(
            wrapper.module.state_dict().values(), bare.state_dict().values(), strict=True
        ):
            assert torch.equal(got, want)
    limits = torch.tensor(sizes)
    assert bool(((out.indices >= 0) & (out.indices < limits)).all())
    # eval mode: decoding the indices gives back exactly what forward returned
    assert torch.equal(wrapper.decode_indices(out.indices), out.quantized)


def test_build_leaves_the_global_rng_and_the_module_as_a_bare_build_would() -> None:
    """The probe runs on a copy with a forked RNG: a k-means-initialised codebook stays
    uninitialised and the next random number is the one a bare build leaves."""
    kwargs = {"codebook_size": 16, "kmeans_init": True}
    torch.manual_seed(0)
    wrapper = ExternalQuantizer("vector_quantize_pytorch.VectorQuantize", DIM, **kwargs)
    after_wrapper = torch.rand(4)
    torch.manual_seed(0)
    bare = reference.VectorQuantize(dim=DIM, **kwargs)
    assert torch.equal(after_wrapper, torch.rand(4))
    assert not bool(wrapper.module._codebook.initted)
    assert wrapper.module.state_dict().keys() == bare.state_dict().keys()
    for got, want in zip(
        wrapper.module.state_dict().values(), bare.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want)
    # the probe saw which buffers a training step changes (the EMA state to sync under DDP)
    assert {"_codebook.embed", "_codebook.cluster_size", "_codebook.initted"} <= set(
        wrapper.state_buffers
    )


def test_decode_rejects_out_of_range_and_misshapen_indices() -> None:
    wrapper, _ = build_pair("ResidualVQ")
    codes = torch.zeros(2, 5, 4, dtype=torch.long)
    codes[1, 2, 3] = 32
    with pytest.raises(IndexRangeError, match=r"index 32.*\[0, 32\)"):
        wrapper.decode_indices(codes)
    with pytest.raises(IndexRangeError, match="index -1"):
        wrapper.decode_indices(torch.full((2, 5, 4), -1))
    with pytest.raises(ValueError, match=r"shape \(batch, tokens, 4\)"):
        wrapper.decode_indices(torch.zeros(2, 5, 3, dtype=torch.long))


# ---- modules whose output cannot be read, and targets that cannot be built -----------------


class ReturnsTensor(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.codebook_size = 4

    def forward(self, x: Tensor) -> Tensor:
        return x


class WrongQuantizedShape(ReturnsTensor):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[..., :1], x[..., 0].long()


class FloatIndices(ReturnsTensor):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x[..., 0]


class IndicesPerBatch(ReturnsTensor):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, torch.zeros(x.shape[0], dtype=torch.long)


class IndicesBeyondCodebook(ReturnsTensor):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, torch.full(x.shape[:2], 4)


class FailsOnForward(ReturnsTensor):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise RuntimeError("boom")


class NoCodebookSize(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, torch.zeros(x.shape[:2], dtype=torch.long)


HERE = "tests.quantizers.test_external"


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("ReturnsTensor", "returned Tensor; expected forward"),
        ("WrongQuantizedShape", r"returned quantized \(2, 5, 1\) for input \(2, 5, 32\)"),
        ("FloatIndices", "returned indices torch.float32"),
        ("IndicesPerBatch", "failed on a probe input .*cannot read the index layout"),
        ("IndicesBeyondCodebook", r"indices in \[4, 4\] for codebook sizes \(4,\)"),
        ("FailsOnForward", "failed on a probe input of shape .*RuntimeError: boom"),
        ("NoCodebookSize", "cannot read the codebook size"),
    ],
)
def test_unreadable_module_fails_at_build_saying_what_was_expected(
    module: str, message: str
) -> None:
    with pytest.raises(ExternalQuantizerError, match=message) as error:
        ExternalQuantizer(f"{HERE}.{module}", DIM)
    assert f"{HERE}.{module}" in str(error.value)


@pytest.mark.parametrize(
    ("target", "kwargs", "message"),
    [
        ("no_such_package.Quantizer", {}, "cannot import 'no_such_package'"),
        ("vector_quantize_pytorch.NoSuchClass", {}, "has no class 'NoSuchClass'"),
        ("ResidualVQ", {}, "must be a dotted path"),
        (
            "vector_quantize_pytorch.FSQ",
            {"levels": [8, 5], "codebook_size": 40},
            r"does not take the keyword\(s\) codebook_size .*`~quantizer.codebook_size`",
        ),
        ("vector_quantize_pytorch.ResidualVQ", {}, r"needs .*codebook_size.*quantizer\."),
        (
            "vector_quantize_pytorch.VectorQuantize",
            {"codebook_size": 8, "straight_through": True, "rotation_trick": True},
            r"building vector_quantize_pytorch.VectorQuantize\(.*\) failed: AssertionError",
        ),
    ],
)
def test_target_that_cannot_be_built_is_a_clear_error(
    target: str, kwargs: dict, message: str
) -> None:
    with pytest.raises(ExternalQuantizerError, match=message) as error:
        ExternalQuantizer(target, DIM, **kwargs)
    assert target in str(error.value)


# ---- DDP: what set_communicator does ------------------------------------------------------


class TwoRanks:
    """A communicator that says there are 2 ranks (collectives are never reached here)."""

    rank, world_size = 0, 2


class EmaMean(nn.Module):
    """A quantizer with state learned outside gradients and no way to sync it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.codebook_size = 1
        self.register_buffer("running_mean", torch.zeros(dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            self.running_mean.lerp_(x.mean((0, 1)), 0.1)
        return x, torch.zeros(x.shape[:2], dtype=torch.long)


def test_unsyncable_state_warns_under_ddp_and_only_there() -> None:
    wrapper = ExternalQuantizer(f"{HERE}.EmaMean", DIM)
    assert wrapper.state_buffers == ("running_mean",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapper.set_communicator(type("One", (), {"rank": 0, "world_size": 1})())
        # stateless FSQ: nothing to sync, nothing to say
        ExternalQuantizer("vector_quantize_pytorch.FSQ", DIM, levels=[5, 5]).set_communicator(
            TwoRanks()
        )
    with pytest.warns(UserWarning, match=r"changes buffers .*\(running_mean\).*rank 0's"):
        wrapper.set_communicator(TwoRanks())


def test_library_codebooks_get_the_communicator_and_lose_it_again() -> None:
    wrapper, _ = build_pair("ResidualVQ")
    codebooks = [layer._codebook for layer in wrapper.module.layers]
    originals = [codebook.all_reduce_fn for codebook in codebooks]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # synced: no warning
        wrapper.set_communicator(TwoRanks())
    for codebook, original in zip(codebooks, originals, strict=True):
        for hook in ("all_reduce_fn", "kmeans_all_reduce_fn", "sample_fn", "replace_sample_fn"):
            assert getattr(codebook, hook).communicator.world_size == 2
        assert codebook.all_reduce_fn is not original
    wrapper.set_communicator(type("One", (), {"rank": 0, "world_size": 1})())
    assert [codebook.all_reduce_fn for codebook in codebooks] == originals


# ---- the config -------------------------------------------------------------------------------


def test_external_keywords_need_no_plus_and_other_quantizers_stay_closed(tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            "quantizer=external",
            "quantizer.target=vector_quantize_pytorch.ResidualVQ",
            "quantizer.num_quantizers=4",
            "quantizer.codebook_size=256",
        ],
        output_dir=tmp_path,
    )
    assert dict(cfg.model.quantizer) == {
        "name": "external",
        "target": "vector_quantize_pytorch.ResidualVQ",
        "codebook_size": 256,
        "num_quantizers": 4,
    }
    with pytest.raises(Exception, match=r"To append to your config use \+quantizer.foo=1"):
        compose_config("train", ["quantizer=vq", "quantizer.foo=1"], output_dir=tmp_path)
