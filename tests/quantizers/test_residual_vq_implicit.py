"""ResidualVQ's implicit neural codebooks (QINCo, `implicit_neural_codebook=True`) and codebook
sizes per depth (`codebook_size=(5, 128, 256)` without `num_quantizers`): the codes API
(decode equals forward bit for bit, index range checks per depth), learning by gradient, and
the defaults left as they were."""

from __future__ import annotations

import pytest
import torch

from src.quantizers import GroupedResidualVQ, IndexRangeError, ResidualVQ, check_contract
from src.quantizers.implicit_codebook import CodebookMLP

DIM = 8


def _qinco(**kwargs: object) -> ResidualVQ:
    torch.manual_seed(0)
    defaults = {"dim": DIM, "num_quantizers": 3, "codebook_size": 16}
    return ResidualVQ(implicit_neural_codebook=True, **{**defaults, **kwargs})


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_cosine_sim": True},
        {"shared_codebook": True},
        {"codebook_dim": 4, "quant_grad_frac": 0.1},
        {"codebook_size": (4, 8, 16)},
        {"mlp_kwargs": {"depth": 1, "dim_hidden": 12}},
    ],
)
@pytest.mark.parametrize("train", [True, False])
def test_decode_equals_forward_exactly(kwargs: dict, train: bool) -> None:
    rvq = _qinco(**kwargs).train(train)
    x = torch.randn(2, 12, DIM)
    mask = torch.rand(2, 12, generator=torch.Generator().manual_seed(0)) > 0.25
    for call in ({}, {"mask": mask}):
        quantized, indices, _ = rvq(x, **call)
        decoded = rvq.get_output_from_indices(indices)
        if "mask" in call:
            assert bool((indices[~mask] == -1).all())
            decoded = torch.where(mask.unsqueeze(-1), decoded, 0.0)
        assert torch.equal(quantized, decoded)
        codes = rvq.get_codes_from_indices(indices)
        assert torch.equal(
            codes.sum(0), rvq.stack.get_output_from_indices(indices, rvq.codebook_transforms())
        )


def test_later_depths_search_a_codebook_conditioned_on_the_earlier_codes() -> None:
    """Depth 1's code of a token is its stored code through the MLP conditioned on depth 0's
    code, the nearest such transformed code to the token's residual (checked by brute force)."""
    rvq = _qinco(num_quantizers=2).eval()
    x = torch.randn(1, 20, DIM)
    indices = rvq(x).indices
    codes = rvq.get_codes_from_indices(indices)  # (2, 1, 20, d)
    first = rvq.layers[0].codebook[indices[0, :, 0]]
    assert torch.equal(codes[0, 0], first)
    per_token = rvq.mlps[0](rvq.layers[1].codebook, condition=first)  # (20, K, d)
    residual = x[0] - first
    nearest = (residual.unsqueeze(1) - per_token).pow(2).sum(-1).argmin(-1)
    assert torch.equal(indices[0, :, 1], nearest)
    torch.testing.assert_close(codes[1, 0], per_token[torch.arange(20), nearest])
    # the transformed codes differ from the stored ones: the MLP is in use
    assert not torch.allclose(codes[1, 0], rvq.layers[1].codebook[nearest])


def test_codebooks_and_mlps_learn_by_gradient_not_ema() -> None:
    rvq = _qinco().train()
    assert all(layer.learnable_codebook and not layer.ema_update for layer in rvq.layers)
    stored = rvq.codebooks.detach().clone()
    x = torch.randn(2, 12, DIM, requires_grad=True)
    quantized, _, loss = rvq(x)
    assert torch.equal(rvq.codebooks.detach(), stored)  # no EMA step in forward
    (quantized.square().mean() + loss.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for mlp in rvq.mlps:
        grads = [p.grad for p in mlp.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    assert all(layer.embed.grad is not None for layer in rvq.layers)


def test_bf16_autocast_searches_float32_codebooks_and_decodes_exactly() -> None:
    rvq = _qinco().eval()
    x = torch.randn(2, 12, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, indices, _ = rvq(x)
        per_token = rvq.mlps[0](rvq.layers[1].codebook, condition=x)
    assert per_token.dtype == torch.float32
    assert quantized.dtype == torch.float32
    assert torch.equal(quantized, rvq.decode_indices(indices))
    assert torch.equal(indices, rvq(x).indices)  # the same codes as without autocast


def test_cross_entropy_call_conditions_on_the_given_codes() -> None:
    rvq = _qinco().eval()
    x = torch.randn(2, 12, DIM)
    quantized, indices, _ = rvq(x)
    again, ce = rvq(x, indices=indices)
    assert torch.equal(again, quantized) and ce.ndim == 0 and torch.isfinite(ce)


def test_refusals_name_the_problem() -> None:
    with pytest.raises(ValueError, match="beam"):
        _qinco(beam_size=2)
    with pytest.raises(ValueError, match="beam_size > 1"):
        _qinco().eval()(torch.randn(1, 4, DIM), beam_size=2)
    with pytest.raises(ValueError, match="mlp_kwargs"):
        ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=8, mlp_kwargs={"depth": 2})
    with pytest.raises(ValueError, match="CodebookMLP"):
        CodebookMLP(DIM)(torch.randn(4, DIM + 1), condition=torch.randn(3, DIM))


def test_mlp_matches_the_concatenated_linear_of_its_definition() -> None:
    torch.manual_seed(0)
    mlp = CodebookMLP(DIM, depth=2, l2norm_output=True)
    codes, condition = torch.randn(5, DIM), torch.randn(2, 3, DIM)
    pairs = torch.cat(
        [condition[:, :, None].expand(-1, -1, 5, -1), codes.expand(2, 3, -1, -1)], dim=-1
    )
    expected = mlp.proj_in(pairs)
    for block in mlp.layers:
        expected = block(expected) + expected
    expected = torch.nn.functional.normalize(expected, dim=-1)
    torch.testing.assert_close(mlp(codes, condition=condition), expected)


# ---- a codebook size per depth --------------------------------------------------------------


def test_sizes_per_depth_infer_the_depth_and_report_each_size() -> None:
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=2, codebook_size=(5, 128, 256)).train()
    assert rvq.num_quantizers == 3 and rvq.codebook_sizes == (5, 128, 256)
    assert rvq.codebook_size == 256 and check_contract(rvq).codebook_sizes == (5, 128, 256)
    assert [tuple(b.shape) for b in rvq.codebooks] == [(5, 2), (128, 2), (256, 2)]
    x = torch.randn(4, 50, 2)
    quantized, indices, loss = rvq(x, freeze_codebook=True)
    assert loss.shape == (1, 3)
    for depth, size in enumerate((5, 128, 256)):
        assert int(indices[..., depth].min()) >= 0 and int(indices[..., depth].max()) < size
    assert torch.equal(quantized, rvq.decode_indices(indices))
    grouped = GroupedResidualVQ(dim=4, groups=2, codebook_size=[4, 8])
    assert grouped.codebook_sizes == (4, 8, 4, 8) and grouped.num_codebooks == 4


def test_sizes_per_depth_check_each_depths_range() -> None:
    rvq = ResidualVQ(dim=2, codebook_size=(5, 128)).eval()
    ok = torch.tensor([[[4, 127]]])
    rvq.decode_indices(ok)
    with pytest.raises(IndexRangeError, match=r"depth 0.*index 5.*\[0, 5\)"):
        rvq.decode_indices(torch.tensor([[[5, 0]]]))
    with pytest.raises(IndexRangeError, match=r"depth 1.*\[0, 128\)"):
        rvq.decode_indices(torch.tensor([[[0, 128]]]))


def test_size_keywords_are_checked() -> None:
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualVQ(dim=2, codebook_size=8)
    with pytest.raises(ValueError, match="3 sizes"):
        ResidualVQ(dim=2, num_quantizers=2, codebook_size=(4, 8, 16))
    with pytest.raises(ValueError, match="shared_codebook"):
        ResidualVQ(dim=2, codebook_size=(4, 8), shared_codebook=True)
    with pytest.raises(ValueError, match="positive"):
        ResidualVQ(dim=2, codebook_size=(4, 0))
    # the same sizes as one int: the same module
    torch.manual_seed(0)
    uniform = ResidualVQ(dim=4, codebook_size=(8, 8))
    torch.manual_seed(0)
    plain = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8)
    assert uniform.codebook_sizes == plain.codebook_sizes == (8, 8)
    x = torch.randn(1, 6, 4)
    assert torch.equal(uniform(x).quantized, plain(x).quantized)
