"""BinaryMapper (and its bottleneck), EvoLFQ and the Sequential helper: values equal the
reference library's (same seed / state), bits and losses by direct computation, the genetic
search improves its fitness and reports the gene that scored it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src.quantizers import (
    FSQ,
    LFQ,
    BinaryMapper,
    BinaryMapperQuantizer,
    EvoLFQ,
    Sequential,
    VectorQuantize,
)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("deterministic_on_eval", [False, True])
def test_binary_mapper_equals_the_reference(training: bool, deterministic_on_eval: bool) -> None:
    reference = pytest.importorskip("vector_quantize_pytorch")
    theirs = reference.BinaryMapper(bits=6, deterministic_on_eval=deterministic_on_eval)
    ours = BinaryMapper(bits=6, deterministic_on_eval=deterministic_on_eval)
    theirs.train(training), ours.train(training)
    logits = torch.randn(3, 5, 6) * 2
    torch.manual_seed(3)
    want = theirs(logits, return_indices=True, reduce_aux_kl_loss=False)
    torch.manual_seed(3)
    got = ours(logits, return_indices=True, reduce_aux_kl_loss=False)
    for mine, reference_value in zip(got, want, strict=True):
        torch.testing.assert_close(mine, reference_value.to(mine.dtype), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        ours.log_prob(logits, indices=got[1]), theirs.log_prob(logits, indices=want[1])
    )


def test_binary_mapper_bits_loss_and_gradient_by_hand() -> None:
    mapper = BinaryMapper(bits=3, kl_loss_threshold=0.1).train()
    logits = torch.randn(200, 3, requires_grad=True)
    one_hot, indices, loss = mapper(logits, return_indices=True)
    # bit i of the code is bit i of the index; the one-hot marks the index
    assert torch.equal(one_hot.argmax(-1), indices)
    bits = (indices.unsqueeze(-1) >> torch.arange(3)) & 1
    assert torch.equal(mapper.codes[indices], bits.bool())
    p = logits.detach().sigmoid()
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).sum(-1)
    torch.testing.assert_close(loss, F.relu(3 * math.log(2) - entropy - 0.1).mean())
    # straight through: the gradient of one_hot . w is w . d(soft code probabilities)
    weights = torch.randn(8)
    (one_hot @ weights).sum().backward()
    soft = torch.stack(
        [torch.where(mapper.codes[k], p, 1 - p).prod(-1) for k in range(8)], -1
    ).requires_grad_()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(mapper.soft_codes(logits.detach()), soft.detach())
    # deterministic thresholds at 1/2
    _, det, _ = mapper.eval()(logits.detach(), deterministic=True, return_indices=True)
    assert torch.equal(det, ((logits.detach() > 0).long() << torch.arange(3)).sum(-1))


def test_binary_mapper_quantizer_trains_and_decodes_exactly() -> None:
    torch.manual_seed(0)
    quantizer = BinaryMapperQuantizer(dim=8, bits=4).train()
    x = torch.randn(2, 7, 8, requires_grad=True)
    out = quantizer(x)
    (out.quantized.square().sum() + out.kl_loss).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert quantizer.project_in.weight.grad.abs().sum() > 0
    assert quantizer.codebook.grad.abs().sum() > 0
    assert torch.equal(out.quantized.detach(), quantizer.codebook[out.indices].detach())
    quantizer.eval()
    first, second = quantizer(x), quantizer(x)  # deterministic in eval (config default)
    assert torch.equal(first.indices, second.indices)
    assert torch.equal(quantizer.decode_indices(first.indices), first.quantized)
    bad = x.detach().clone()
    bad[0, 2, 5] = float("nan")
    out = quantizer.train()(bad)
    assert out.indices[0, 2] == -1 and torch.isfinite(out.kl_loss)
    assert torch.equal(out.quantized[0, 2], torch.zeros(8))


@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_evo_lfq_equals_the_reference(num_codebooks: int) -> None:
    reference = pytest.importorskip("vector_quantize_pytorch")
    width = 4 * num_codebooks
    torch.manual_seed(0)
    encoder, decoder = torch.nn.Linear(12, width), torch.nn.Linear(width, 12)
    kwargs = {"dim": width, "codebook_size": 16, "num_codebooks": num_codebooks}
    theirs = reference.EvoLFQ(encoder, decoder, **kwargs).eval()
    ours = EvoLFQ(encoder, decoder, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict())
    for x in (torch.randn(3, 5, 12), torch.randn(4, 12)):
        want, got = theirs(x), ours(x)
        torch.testing.assert_close(got.reconstructed, want[0], atol=1e-5, rtol=0)
        assert torch.equal(got.indices, want[1]) and got.quantized is got.reconstructed
        bits = ours.encode(x)
        assert torch.equal(bits, theirs.encode(x))
        torch.testing.assert_close(ours.decode_bits(bits), theirs.decode_bits(bits))
        torch.testing.assert_close(ours.decode_bits(bits), got.reconstructed)
        assert torch.equal(ours.decode_indices(got.indices), got.reconstructed)


def test_evo_lfq_encode_gives_the_code_bits_with_a_projection() -> None:
    """With dim != code width the reference's encode reads the signs of the projected output
    (dim values, which decode_bits then rejects); ours returns the code bits."""
    evo = EvoLFQ(dim=16, codebook_size=2**5)
    x = torch.randn(3, 4, 16)
    bits = evo.encode(x)
    assert bits.shape == (3, 4, 5)
    weights = 2 ** torch.arange(4, -1, -1)
    assert torch.equal((bits.long() * weights).sum(-1), evo.eval()(x).indices)
    torch.testing.assert_close(evo.decode_bits(bits), evo(x).quantized)


def test_evolve_improves_and_reports_the_gene_that_scored() -> None:
    torch.manual_seed(0)
    evo = EvoLFQ(dim=8, codebook_size=2**8, pop_size=32, mutation_rate=0.05)
    target = evo.decode_bits(torch.randint(0, 2, (1, 8)).float())[0]

    def fitness(decoded: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return -(decoded - target).square().sum(-1)

    results = list(evo.evolve(fitness, shape=(8,), generations=25))
    best = [r.best_fitness for r in results]
    assert best == sorted(best) and best[-1] > best[0]
    final = results[-1]
    assert fitness(evo.decode_bits(final.best_gene[None]), final.best_gene[None]).item() == (
        pytest.approx(final.best_fitness)
    )
    assert final.best_fitness > -1e-6  # 256 genes, 25 generations of 32: the target is found
    with pytest.raises(ValueError, match="pop_size"):
        EvoLFQ(dim=8, codebook_size=256, pop_size=1, elitism_count=1)


def test_sequential_runs_modules_around_one_quantizer() -> None:
    torch.manual_seed(0)
    inner, outer = torch.nn.Linear(6, 4), torch.nn.Linear(4, 6)
    fsq = FSQ(levels=[8, 5, 5, 5])
    model = Sequential(inner, fsq, outer)
    x = torch.randn(2, 9, 6)
    out, indices = model(x)
    expected = fsq(inner(x))
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(out, outer(expected.quantized))
    lfq = LFQ(dim=4, codebook_size=16).train()
    _, _, loss = Sequential(inner, lfq)(x, inv_temperature=10.0)
    assert loss.ndim == 0
    with pytest.raises(ValueError, match="exactly one quantizer"):
        Sequential(inner, outer)
    with pytest.raises(ValueError, match="exactly one quantizer"):
        Sequential(fsq, VectorQuantize(dim=4, codebook_size=8))
