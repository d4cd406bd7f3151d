"""Checkpoints of the reference library (vector-quantize-pytorch) load into our quantizers.

Each case builds the reference class, moves its state off the initialisation (parameters
nudged, two training steps so EMA buffers and k-means state change), saves the state dict
and loads it into ours (`load_state_dict` directly where the class registers the reference
keys hook, else `load_reference_state_dict`). In eval mode both must then give the same
output (to 1e-5) and the same indices on random inputs. Our ResidualFSQ takes the
reference's algorithm with `refinement="rescaled"` (keywords in OURS_ONLY are not passed to
the reference); its default exact refinement refuses a reference checkpoint (tested below).
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import vector_quantize_pytorch as reference

import src.quantizers as ours
from src.quantizers.reference_checkpoint import (
    convert_reference_state_dict,
    load_reference_state_dict,
)

SEQ = (2, 10, 16)
IMAGE = (2, 16, 4, 4)

RVQ3 = {"codebook_size": 32, "num_quantizers": 3}
RFSQ = {"levels": [8, 5, 5], "refinement": "rescaled"}
OURS_ONLY = {"refinement"}  # our keywords the reference does not take
MLP = {"depth": 2, "dim_hidden": 24}

# (class, keywords, input shape, loads through plain load_state_dict)
CASES = [
    ("VectorQuantize", {"codebook_size": 32}, SEQ, True),
    ("VectorQuantize", {"codebook_size": 32, "codebook_dim": 4}, SEQ, True),
    ("VectorQuantize", {"codebook_size": 32, "use_cosine_sim": True}, SEQ, True),
    ("VectorQuantize", {"codebook_size": 32, "kmeans_init": True}, SEQ, True),
    ("VectorQuantize", {"codebook_size": 32, "threshold_ema_dead_code": 2}, SEQ, True),
    ("VectorQuantize", {"codebook_size": 32, "codebook_dim": 4, "heads": 2}, SEQ, True),
    (
        "VectorQuantize",
        {"codebook_size": 32, "codebook_dim": 4, "heads": 2, "separate_codebook_per_head": True},
        SEQ,
        True,
    ),
    ("VectorQuantize", {"codebook_size": 32, "accept_image_fmap": True}, IMAGE, True),
    (
        "VectorQuantize",
        {"codebook_size": 32, "learnable_codebook": True, "ema_update": False},
        SEQ,
        True,
    ),
    ("ResidualVQ", {"codebook_size": 32, "num_quantizers": 3}, SEQ, True),
    ("ResidualVQ", {"codebook_size": 32, "num_quantizers": 3, "codebook_dim": 8}, SEQ, True),
    ("ResidualVQ", {"codebook_size": 32, "num_quantizers": 3, "shared_codebook": True}, SEQ, True),
    ("ResidualVQ", {"codebook_size": 32, "num_quantizers": 3, "use_cosine_sim": True}, SEQ, True),
    ("GroupedResidualVQ", {"codebook_size": 32, "num_quantizers": 2, "groups": 2}, SEQ, True),
    # implicit neural codebooks (QINCo): the reference's `mlps.<i>.` load unchanged
    ("ResidualVQ", {**RVQ3, "implicit_neural_codebook": True}, SEQ, True),
    ("ResidualVQ", {**RVQ3, "implicit_neural_codebook": True, "shared_codebook": True}, SEQ, True),
    (
        "ResidualVQ",
        {**RVQ3, "implicit_neural_codebook": True, "codebook_dim": 8, "mlp_kwargs": MLP},
        SEQ,
        True,
    ),
    # a codebook size per depth, without num_quantizers
    ("ResidualVQ", {"codebook_size": (8, 16, 32)}, SEQ, True),
    ("ResidualVQ", {"codebook_size": (8, 16, 32), "implicit_neural_codebook": True}, SEQ, True),
    ("GroupedResidualVQ", {"codebook_size": (8, 16), "groups": 2}, SEQ, True),
    # beam search (eval mode searches with eval_beam_size)
    ("ResidualVQ", {**RVQ3, "beam_size": 2, "eval_beam_size": 3}, SEQ, True),
    (
        "ResidualVQ",
        {
            **RVQ3,
            "beam_size": 2,
            "beam_score_quantizer_weights": [1.0, 0.5, 2.0],
            "codebook_dim": 8,
        },
        SEQ,
        True,
    ),
    ("FSQ", {"levels": [8, 5, 5]}, SEQ, True),
    ("LFQ", {"codebook_size": 256}, SEQ, False),
    ("LFQ", {"codebook_size": 16, "num_codebooks": 2}, SEQ, False),
    ("ResidualLFQ", {"codebook_size": 256, "num_quantizers": 2}, SEQ, True),
    ("GroupedResidualLFQ", {"codebook_size": 256, "num_quantizers": 2, "groups": 2}, SEQ, True),
    ("SimVQ", {"codebook_size": 32}, SEQ, True),
    ("ResidualSimVQ", {"codebook_size": 32, "num_quantizers": 2}, SEQ, True),
    # refinement="rescaled" (ours only) is the reference's residual FSQ
    ("ResidualFSQ", {**RFSQ, "num_quantizers": 2}, SEQ, True),
    ("ResidualFSQ", {**RFSQ, "num_quantizers": 3, "quantize_dropout": True}, SEQ, True),
    ("ResidualFSQ", {**RFSQ, "num_quantizers": 3, "bound_hard_clamp": False}, SEQ, True),
    (
        "ResidualFSQ",
        {**RFSQ, "num_quantizers": 3, "bound_hard_clamp": False, "soft_clamp_input_value": 1.5},
        SEQ,
        True,
    ),
    ("ResidualFSQ", {**RFSQ, "num_quantizers": 2, "is_channel_first": True}, IMAGE, True),
    ("GroupedResidualFSQ", {**RFSQ, "num_quantizers": 2, "groups": 2}, SEQ, True),
    (
        "GroupedResidualFSQ",
        {**RFSQ, "num_quantizers": 3, "groups": 2, "bound_hard_clamp": False},
        SEQ,
        True,
    ),
    ("LatentQuantize", {"levels": [5, 5, 5], "codebook_dim": 3}, IMAGE, False),
]

# Reference bug: LatentQuantize maps the chosen values back to indices through the initial
# grid formula, so once its values have moved (training) its indices name other cells and its
# own decode of them differs from its forward. Outputs must match; our indices are the cells
# chosen, checked by decoding them.
INDICES_DIFFER = {"LatentQuantize"}
# Reference layout (1.32.0): ResidualFSQ(is_channel_first=True) returns indices (b, q, ...),
# which its own get_output_from_indices does not take (it reads q from the last axis). Ours
# are (b, ..., q), the layout both decode; compared after moving the reference's q axis.
QUANTIZER_AXIS_1 = "is_channel_first"


def _case_id(case: tuple) -> str:
    name, kwargs, _, _ = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


def _trained_reference(name: str, kwargs: dict, shape: tuple[int, ...]) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {k: v for k, v in kwargs.items() if k not in OURS_ONLY}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = getattr(reference, name)(dim=16, **kwargs)
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        module.train()
        for _ in range(2):
            module(torch.randn(*shape))
    return module.eval()


@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c)) for c in CASES])
def test_reference_state_dict_loads_and_eval_outputs_match(case: tuple) -> None:
    name, kwargs, shape, through_hook = case
    ref = _trained_reference(name, kwargs, shape)
    state = ref.state_dict()
    mine = getattr(ours, name)(dim=16, **kwargs)
    load = mine.load_state_dict if through_hook else lambda s: load_reference_state_dict(mine, s)
    result = load(state)
    assert not result.missing_keys and not result.unexpected_keys
    mine.eval()
    for seed in range(3):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = ref(x)
            got = mine(x)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5)
        if name in INDICES_DIFFER:
            torch.testing.assert_close(mine.indices_to_codes(got[1]), got[0])
            continue
        expected_indices = (
            expected[1].movedim(1, -1) if kwargs.get(QUANTIZER_AXIS_1) else expected[1]
        )
        assert torch.equal(got[1].long(), expected_indices.long())


@pytest.mark.parametrize("masked", [False, True])
def test_beam_search_losses_equal_the_references(masked: bool) -> None:
    """A beam search returns the reference's per-depth losses: shape (Q,) (its greedy pass and
    ours give (1, Q)), the mean over valid tokens of each depth's commitment on the chosen
    path; quantize dropout zeroes the dropped depths in both."""
    kwargs = {**RVQ3, "beam_size": 2, "eval_beam_size": 3}
    ref = _trained_reference("ResidualVQ", kwargs, SEQ)
    mine = ours.ResidualVQ(dim=16, **kwargs)
    mine.load_state_dict(ref.state_dict())
    mine.eval()
    x = torch.randn(*SEQ, generator=torch.Generator().manual_seed(5))
    mask = torch.rand(SEQ[:2], generator=torch.Generator().manual_seed(6)) > 0.3
    call = {"mask": mask} if masked else {}
    with torch.no_grad():
        expected, got = ref(x, **call), mine(x, **call)
    assert got.loss.shape == expected[2].shape == (3,)
    torch.testing.assert_close(got.loss, expected[2], rtol=0, atol=1e-6)
    assert torch.equal(got.indices, expected[1])


def test_conversion_is_idempotent_and_leaves_our_own_keys_alone() -> None:
    ref = _trained_reference("ResidualVQ", {"codebook_size": 32, "num_quantizers": 2}, SEQ)
    mine = ours.ResidualVQ(dim=16, codebook_size=32, num_quantizers=2)
    once = convert_reference_state_dict(mine, ref.state_dict())
    assert set(once) == set(mine.state_dict())
    twice = convert_reference_state_dict(mine, once)
    assert set(twice) == set(once)
    assert all(torch.equal(once[k], twice[k]) for k in once)
    own = mine.state_dict()
    assert all(torch.equal(own[k], v) for k, v in convert_reference_state_dict(mine, own).items())


def test_shared_codebook_keeps_one_copy_and_rejects_a_mismatched_shape() -> None:
    kwargs = {"codebook_size": 32, "num_quantizers": 3, "shared_codebook": True}
    ref = _trained_reference("ResidualVQ", kwargs, SEQ)
    mine = ours.ResidualVQ(dim=16, **kwargs)
    mine.load_state_dict(ref.state_dict())
    torch.testing.assert_close(mine.stack.layers[0].embed, ref.layers[0]._codebook.embed[0])
    wrong = ours.ResidualVQ(dim=16, codebook_size=16, num_quantizers=3, shared_codebook=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        wrong.load_state_dict(ref.state_dict())


def test_image_maps_through_residual_vq_where_the_reference_raises() -> None:
    """Reference bug (1.32.0): ResidualVQ(accept_image_fmap=True) fails in forward (it
    concatenates (b, d, h, w) residuals along the wrong axis). Ours quantizes the map as the
    reference's sequence model quantizes the flattened tokens, from the same checkpoint."""
    kwargs = {"codebook_size": 32, "num_quantizers": 2}
    broken = reference.ResidualVQ(dim=16, accept_image_fmap=True, **kwargs).eval()
    with pytest.raises(RuntimeError):
        broken(torch.randn(*IMAGE))
    ref = _trained_reference("ResidualVQ", kwargs, SEQ)
    mine = ours.ResidualVQ(dim=16, accept_image_fmap=True, **kwargs)
    mine.load_state_dict(ref.state_dict())
    mine.eval()
    x = torch.randn(*IMAGE)
    tokens = x.flatten(2).transpose(1, 2)  # (b, h*w, d)
    with torch.no_grad():
        expected, expected_idx, _ = ref(tokens)
        got, got_idx, _ = mine(x)
    torch.testing.assert_close(got.flatten(2).transpose(1, 2), expected, rtol=0, atol=1e-5)
    assert torch.equal(got_idx.flatten(1, 2), expected_idx)


def test_codebook_diversity_averages_over_every_token_unlike_the_reference() -> None:
    """Reference behaviour we do not copy (1.32.0): its codebook diversity loss averages the
    code distribution over batch and heads but not over sequence positions, so it is minus
    the mean per-position entropy; with batch 1 that rewards each token for being unsure of
    its code rather than the batch for spreading over the codebook. Ours is minus the
    entropy of the distribution averaged over every valid token."""
    kwargs = {"codebook_size": 32, "codebook_diversity_loss_weight": 1.0}
    torch.manual_seed(0)
    ref = reference.VectorQuantize(dim=16, codebook_diversity_temperature=1.0, **kwargs)
    mine = ours.VectorQuantize(dim=16, codebook_diversity_temperature=1.0, **kwargs)
    mine.load_state_dict(ref.state_dict())
    codebook = mine.codebook.clone()
    x = torch.randn(1, 50, 16)
    *_, ref_parts = ref.train()(x, return_loss_breakdown=True)
    *_, parts = mine.train()(x, return_loss_breakdown=True)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.clamp_min(1e-5).log()).sum(-1)

    probs = (-torch.cdist(x[0], codebook)).softmax(-1)  # (50, 32)
    torch.testing.assert_close(ref_parts.codebook_diversity, -entropy(probs).mean())
    torch.testing.assert_close(parts.codebook_diversity, -entropy(probs.mean(0)))


def _nested(module: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 4), module)


@pytest.mark.parametrize(
    "how", ["load_state_dict", "load_reference_state_dict", "nested", "grouped"]
)
def test_reference_residual_fsq_is_refused_by_the_exact_refinement(how: str) -> None:
    """A reference ResidualFSQ state dict holds only projections, which fit our default
    refinement='exact' module too; loading it there raises naming refinement='rescaled'
    (plain, through load_reference_state_dict, inside a larger model, grouped), while our own
    exact checkpoints, saved through torch.save, still load."""
    kwargs = {"levels": [8, 5, 5], "num_quantizers": 2}
    grouped = how == "grouped"
    name = "GroupedResidualFSQ" if grouped else "ResidualFSQ"
    extra = {"groups": 2} if grouped else {}
    ref = _trained_reference(name, {**kwargs, **extra}, SEQ)
    mine = getattr(ours, name)(dim=16, **kwargs, **extra)
    state = ref.state_dict()
    if how == "nested":
        mine, state = _nested(mine), _nested(ref).state_dict()
    load = {"load_reference_state_dict": lambda s: load_reference_state_dict(mine, s)}.get(
        how, mine.load_state_dict
    )
    with pytest.raises(ValueError, match=r"refinement='rescaled'"):
        load(state)
    buffer = io.BytesIO()
    torch.save(mine.state_dict(), buffer)
    buffer.seek(0)
    result = mine.load_state_dict(torch.load(buffer))
    assert not result.missing_keys and not result.unexpected_keys
    rescaled = getattr(ours, name)(dim=16, refinement="rescaled", **kwargs, **extra)
    (_nested(rescaled) if how == "nested" else rescaled).load_state_dict(state)


def test_grouped_residual_fsq_image_maps_where_the_reference_raises() -> None:
    """Reference bug (1.32.0): GroupedResidualFSQ(accept_image_fmap=True) does not tell its
    groups the maps are channel-first, so its forward fails. Ours quantizes each group's map
    as the reference's sequence model quantizes the flattened tokens, from its checkpoint."""
    kwargs = {"levels": [8, 5, 5], "num_quantizers": 2, "groups": 2}
    broken = reference.GroupedResidualFSQ(dim=16, accept_image_fmap=True, **kwargs).eval()
    with pytest.raises(RuntimeError):
        broken(torch.randn(*IMAGE))
    ref = _trained_reference("GroupedResidualFSQ", kwargs, SEQ)
    mine = ours.GroupedResidualFSQ(
        dim=16, accept_image_fmap=True, refinement="rescaled", **kwargs
    ).eval()
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(*IMAGE)
    tokens = x.flatten(2).transpose(1, 2)  # (b, h*w, d)
    with torch.no_grad():
        expected, expected_idx = ref(tokens)
        got, got_idx = mine(x)
    torch.testing.assert_close(got.flatten(2).transpose(1, 2), expected, rtol=0, atol=1e-5)
    assert torch.equal(got_idx.flatten(2, 3), expected_idx.long())
