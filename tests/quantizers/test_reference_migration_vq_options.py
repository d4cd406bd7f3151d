"""Reference checkpoints of VectorQuantize with `affine_param` and `vq_bridge` load into ours
(strict `load_state_dict`, through the reference-keys hook) and give the reference's eval
outputs and indices; and the reference bug kept out of ours: its eval forward moves the affine
batch moments towards each eval batch (its update has no training check), ours leaves them."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from src.quantizers import VectorQuantize

reference = pytest.importorskip("vector_quantize_pytorch")  # the dev dependency, 1.32.0

DIM, SHAPE = 16, (2, 10, 16)


def _trained(module: torch.nn.Module, steps: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        module.train()
        for _ in range(steps):
            module(torch.randn(*SHAPE) * 2 + 1)
    return module.eval()


def test_affine_param_state_loads_and_eval_equals_the_reference() -> None:
    torch.manual_seed(0)
    theirs = _trained(reference.VectorQuantize(dim=DIM, codebook_size=32, affine_param=True))
    ours = VectorQuantize(dim=DIM, codebook_size=32, affine_param=True)
    result = ours.load_state_dict(theirs.state_dict())  # strict: no key missing or left over
    assert not result.missing_keys and not result.unexpected_keys
    assert not bool(ours.affine.batch_mean_needs_init)  # set by the reference's training
    torch.testing.assert_close(ours.affine.batch_mean, theirs._codebook.batch_mean)
    ours.eval()
    moments = {k: v.clone() for k, v in ours.affine.state_dict().items()}
    fixed = copy.deepcopy(theirs)

    # the reference bug: an eval call moves its batch moments (decay 0.99) towards the batch
    before = theirs._codebook.batch_mean.clone()
    with torch.no_grad():
        theirs(torch.randn(*SHAPE) + 5)
    assert not torch.equal(theirs._codebook.batch_mean, before)
    # compared with that update switched off (decay 1 keeps the moments), outputs are equal
    fixed._codebook.affine_param_batch_decay = 1.0
    for seed in range(3):
        x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 + 1
        with torch.no_grad():
            expected, got = fixed(x), ours(x)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5)
        assert torch.equal(got[1], expected[1])
    assert all(torch.equal(v, ours.affine.state_dict()[k]) for k, v in moments.items())


def test_untrained_affine_reference_loads_with_its_moments_still_to_be_set() -> None:
    theirs = reference.VectorQuantize(dim=DIM, codebook_size=32, affine_param=True)
    ours = VectorQuantize(dim=DIM, codebook_size=32, affine_param=True)
    result = ours.load_state_dict(theirs.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert bool(ours.affine.batch_mean_needs_init) and bool(ours.affine.batch_variance_needs_init)


def test_vq_bridge_state_loads_and_eval_equals_the_reference() -> None:
    torch.manual_seed(0)
    theirs = _trained(
        reference.VectorQuantize(
            dim=DIM, codebook_size=32, vq_bridge=torch.nn.Linear(DIM, DIM), learnable_codebook=True
        )
    )
    ours = VectorQuantize(
        dim=DIM, codebook_size=32, vq_bridge=torch.nn.Linear(DIM, DIM), learnable_codebook=True
    )
    result = ours.load_state_dict(theirs.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(ours.vq_bridge.weight, theirs._codebook.vq_bridge.weight)
    ours.eval()
    for seed in range(3):
        x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected, got = theirs(x), ours(x)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5)
        assert torch.equal(got[1], expected[1])
