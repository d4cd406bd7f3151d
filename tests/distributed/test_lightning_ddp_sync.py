"""Lightning's own DDP (2 CPU processes, gloo) with the project's ImageTokenizer: the quantizer
learns from both ranks' data, identically on both, as one process on the union of batches.

Rank 0 sees patterns 0-1, rank 1 patterns 2-3 (tests/distributed/lightning_tokenizer_job.py).
Lightning's DDP broadcasts rank 0's buffers at every forward, so ranks agreeing after training
says little by itself: the checks that matter are the match with one process on the union
and rank 1's tokens showing up in k-means and in dead-code revival. The control (the same
training, no communicator installed) shows each check failing without the sync.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import Tensor

from src.utils.ddp_multirun import LAUNCH_VARIABLES
from tests.distributed import lightning_tokenizer_job as job
from tests.distributed.harness import assert_ranks_agree_and_match
from tests.helpers import ROOT

Run = dict[str, Any]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Run]]:
    """Every case and control on 2 DDP ranks, started as `train.py trainer=ddp_sim` starts."""
    out = tmp_path_factory.mktemp("lightning_ddp")
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCH_VARIABLES, "RANK")}
    command = [sys.executable, "-m", "tests.distributed.lightning_tokenizer_job", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    runs = {
        n: [torch.load(out / f"{n}.rank{r}.pt", weights_only=True) for r in (0, 1)]
        for n in job.RUNS
    }
    assert [run["rank"] for run in runs["vq"]] == [0, 1]
    return runs


@pytest.fixture(scope="module")
def single() -> dict[str, Run]:
    """Every case on one process that sees each whole global batch."""
    return {name: job.train_case(name, devices=1) for name in job.CASES}


def _by_step(run: Run) -> dict[str, Tensor]:
    return {f"step{s}/{k}": v for s, state in enumerate(run["steps"]) for k, v in state.items()}


@pytest.mark.parametrize("name", sorted(set(job.CASES) - {"fsq_norm"}))
def test_quantizer_state_agrees_on_ranks_and_equals_one_process_on_the_union(
    ddp, single, name: str
) -> None:
    ranks = ddp[name]
    assert len(ranks[0]["steps"]) == job.STEPS
    assert_ranks_agree_and_match([_by_step(r) for r in ranks], _by_step(single[name]))
    # the whole tokenizer too (AdamW divides by tiny second moments: a looser tolerance)
    assert_ranks_agree_and_match([r["model"] for r in ranks], single[name]["model"], tol=1e-4)


def _nearest_code_distance(tokens: Tensor, codebook: Tensor) -> Tensor:
    return torch.cdist(tokens, codebook).min(dim=1).values


def test_kmeans_init_put_codes_on_rank_1s_clusters(ddp) -> None:
    mine, theirs = ddp["vq"][1]["tokens"][0], ddp["vq"][0]["tokens"][0]
    gap = torch.cdist(mine, theirs).min()  # rank 1's tokens lie this far from rank 0's
    synced = _nearest_code_distance(mine, ddp["vq"][0]["steps"][0]["embed"])
    assert synced.median() < gap / 4, "most of rank 1's tokens have no code of their own"
    control = _nearest_code_distance(mine, ddp["vq_unsynced"][0]["steps"][0]["embed"])
    assert control.min() > gap * 0.9, "without the sync, rank 0's codes would not reach rank 1"


def _holds(tokens: Tensor, code: Tensor) -> bool:
    """Whether `code` is one of `tokens` (computed again outside the step: float tolerance)."""
    return bool(torch.isclose(tokens, code, rtol=0, atol=1e-6).all(dim=1).any())


def test_dead_codes_are_revived_from_both_ranks_tokens(ddp) -> None:
    ranks = ddp["vq"]
    revived_from = [0, 0]
    for step, state in enumerate(ranks[0]["steps"]):
        # a code revived in this step has exactly the threshold as its EMA size
        for code in state["embed"][state["cluster_size"] == job.THRESHOLD]:
            owners = [r for r in (0, 1) if _holds(ranks[r]["tokens"][step], code)]
            assert len(owners) == 1, "a revived code is not one of the step's tokens"
            revived_from[owners[0]] += 1
    assert min(revived_from) > 0, f"revived codes per rank: {revived_from}"


def test_quantize_dropout_kept_fewer_layers_on_some_step(ddp) -> None:
    # a layer first used after step 0 was k-means initialised late: the depth drawn (rank 0's,
    # broadcast; the state agreeing with one process says every rank used it) left it out
    first_steps = ddp["rvq"][0]["steps"]
    late = [k for k, v in first_steps[0].items() if k.endswith("initted") and not bool(v)]
    assert late, "the seeded depth draws never dropped a layer: the case tests no dropout"
    assert all(bool(first_steps[-1][k]) for k in late)


def test_the_control_without_communicator_fails_both_checks(ddp, single) -> None:
    ranks = ddp["vq_unsynced"]
    # recorded after each step's update, before the next forward's buffer broadcast
    assert not torch.equal(ranks[0]["steps"][0]["embed"], ranks[1]["steps"][0]["embed"])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            ranks[0]["steps"][0]["embed"], single["vq"]["steps"][0]["embed"], rtol=1e-3, atol=1e-3
        )


def test_latent_norm_statistics_are_the_union_s_and_the_control_s_are_not(ddp, single) -> None:
    """Batch statistics are all-reduced through the communicator: the running estimates on
    both ranks are the single process's on the union; without a communicator rank 0's
    (which DDP then broadcasts) reflect only its own clusters.

    The running mean is compared more loosely: the encoder's last bias gets an exactly zero
    gradient under the normalisation, and AdamW turns the rounding noise of that zero (which
    differs between 2 ranks and 1 process) into steps of ~1e-5, which the mean follows.
    """
    expected = single["fsq_norm"]["model"]
    control = ddp["fsq_norm_unsynced"][0]["model"]
    for key, atol in (("latent_norm.running_var", 1e-5), ("latent_norm.running_mean", 1e-3)):
        for run in ddp["fsq_norm"]:
            torch.testing.assert_close(run["model"][key], expected[key], atol=atol, rtol=0)
        assert (control[key] - expected[key]).abs().max() > 0.01, key
