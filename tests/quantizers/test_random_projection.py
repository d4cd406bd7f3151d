"""RandomProjectionQuantizer: the guide's shapes, brute-force indices, frozen state, rank sync,
and the clear error when it is asked to be an image tokenizer's bottleneck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src.models.quantizer_adapter import bottleneck_quantizers, build_latent_quantizer
from src.quantizers import RandomProjectionQuantizer, build_quantizer, install_communicator


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _brute_force(rpq: RandomProjectionQuantizer, x: torch.Tensor, norm: bool) -> torch.Tensor:
    if norm:
        x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
            x.var(-1, unbiased=False, keepdim=True) + 1e-5
        )
    out = torch.empty(*x.shape[:2], rpq.num_codebooks, dtype=torch.long)
    for h in range(rpq.num_codebooks):
        projected = x @ rpq.rand_projs[h]
        projected = projected / projected.norm(dim=-1, keepdim=True)
        codes = rpq.codebook[h] / rpq.codebook[h].norm(dim=-1, keepdim=True)
        out[..., h] = torch.cdist(projected, codes[None].expand(x.shape[0], -1, -1)).argmin(-1)
    return out


def test_guide_example() -> None:
    quantizer = RandomProjectionQuantizer(
        dim=512, num_codebooks=16, codebook_dim=256, codebook_size=1024
    )
    indices = quantizer(torch.randn(1, 1024, 512))
    assert indices.shape == (1, 1024, 16) and indices.dtype == torch.int64
    assert indices.min() >= 0 and indices.max() < 1024
    assert quantizer.num_codebooks == 16 and quantizer.codebook_size == 1024


@pytest.mark.parametrize("norm", [True, False])
def test_indices_are_the_nearest_unit_code_of_the_normalised_projection(norm: bool) -> None:
    rpq = RandomProjectionQuantizer(
        dim=24, num_codebooks=3, codebook_dim=8, codebook_size=64, norm=norm
    )
    x = torch.randn(2, 100, 24) * 3 + 1
    indices = rpq(x)
    assert torch.equal(indices, _brute_force(rpq, x, norm))
    assert torch.allclose(rpq.codebook.norm(dim=-1), torch.ones(3, 64))
    # many distinct targets per codebook: the random codes are not collapsed
    assert all(indices[..., h].unique().numel() > 20 for h in range(3))


def test_norm_makes_targets_invariant_to_token_offset_and_scale() -> None:
    rpq = RandomProjectionQuantizer(dim=16, num_codebooks=2, codebook_dim=8, codebook_size=32)
    x = torch.randn(1, 50, 16)
    assert torch.equal(rpq(x), rpq(5 * x + 2))
    plain = RandomProjectionQuantizer(
        dim=16, num_codebooks=2, codebook_dim=8, codebook_size=32, norm=False
    )
    assert not torch.equal(plain(x), plain(x + 2))


def test_frozen_nothing_learns_and_a_training_step_changes_nothing() -> None:
    rpq = build_quantizer("rpq", dim=16, num_codebooks=2, codebook_dim=8, codebook_size=32)
    assert list(rpq.parameters()) == []
    before = {k: v.clone() for k, v in rpq.state_dict().items()}
    assert set(before) == {"rand_projs", "codebook"}
    rpq.train()
    x = torch.randn(4, 20, 16, requires_grad=True)
    indices = rpq(x)
    assert not indices.requires_grad
    logits = torch.randn(4, 20, 2, 32, requires_grad=True)  # a masked-prediction head's output
    F.cross_entropy(logits.flatten(0, 2), indices.flatten()).backward()
    for key, value in rpq.state_dict().items():
        assert torch.equal(value, before[key])


class _RankOne:
    rank, world_size = 1, 2

    def __init__(self, source: RandomProjectionQuantizer) -> None:
        self.source = source
        self.calls = 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack([tensor, tensor])

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self.calls += 1
        assert src == 0
        rank0 = self.source.rand_projs if tensor.shape == self.source.rand_projs.shape else None
        return (self.source.codebook if rank0 is None else rank0).clone()


def test_every_rank_uses_rank_zeros_projections_and_codes() -> None:
    rank0 = RandomProjectionQuantizer(dim=16, num_codebooks=2, codebook_dim=8, codebook_size=32)
    rank1 = RandomProjectionQuantizer(dim=16, num_codebooks=2, codebook_dim=8, codebook_size=32)
    x = torch.randn(2, 40, 16)
    assert not torch.equal(rank0(x), rank1(x))
    comm = _RankOne(rank0)
    install_communicator(rank1, comm)
    assert torch.equal(rank1(x), rank0(x))
    rank1(x)
    assert comm.calls == 2  # once (projection + codes), not on every call


def test_bad_input_names_the_layout() -> None:
    rpq = RandomProjectionQuantizer(dim=16, num_codebooks=2, codebook_dim=8, codebook_size=32)
    with pytest.raises(ValueError, match=r"\(batch, seq, dim=16\)"):
        rpq(torch.randn(2, 16, 4, 4))


def test_image_tokenizer_refuses_an_index_only_quantizer() -> None:
    assert "rpq" not in bottleneck_quantizers() and "rvq" in bottleneck_quantizers()
    config = {"name": "rpq", "num_codebooks": 2, "codebook_dim": 8, "codebook_size": 32}
    with pytest.raises(ValueError, match=r"rpq produces only indices.*pick one of: .*fsq"):
        build_latent_quantizer(config, latent_dim=16)
