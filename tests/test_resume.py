"""Kill-and-resume equals an uninterrupted run; preemption by signal; logs continue.

One uninterrupted reference run (module fixture) against runs of train.py in a subprocess that
are SIGKILLed or sent SIGTERM / SIGUSR1 at a known step, then resumed with the same run_name.
VQ with k-means init and dead-code replacement draws from the global RNG during training, and
its EMA codebook lives in buffers, so equality needs every piece of the resume state.
"""

from __future__ import annotations

import csv
import shutil
import signal
from pathlib import Path

import pytest
import torch
import wandb
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.callbacks.preemption import PREEMPTED_EXIT_CODE
from src.loggers.resumable_csv import ROLLED_BACK_FILE
from tests.conftest import compose_config
from tests.helpers import read_metrics_csv
from tests.run_control_helpers import start_script, wait_for_file
from tests.wandb_offline import offline_runs, summarize
from train import train

# 2 epochs of 4 batches = 8 steps; checkpoints every 2 steps (2, 4, 6, 8); validation per epoch
RUN = [
    "quantizer=vq",
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=4",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "+logger.csv.flush_logs_every_n_steps=1",
    "callbacks.periodic_checkpoint.every_n_train_steps=2",
    "callbacks.model_summary=null",
    "callbacks.reconstruction_grid=null",
    "callbacks.code_frequencies=null",
    "extras.print_config=false",
    "throughput.window_size=2",
]
TENSORBOARD = "logger=[csv,tensorboard]"
FINAL = ["val/psnr", "val/loss", "val/codebook/perplexity", "val/codebook/dead_codes", "test/psnr"]
FINAL += ["test/loss", "test/codebook/perplexity", "test/codebook/utilization"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, float], Path]:
    """Metrics and run directory of the uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference")
    return train(compose_config("train", RUN, output_dir=run_dir)), run_dir


def start_held_run(log_dir: Path, hold_step: int, *extra: str):
    """train.py run_name=held in a subprocess, held after step ``hold_step``."""
    flag = log_dir / "held"
    process = start_script(
        "train.py",
        *RUN,
        *extra,
        "run_name=held",
        f"paths.log_dir={log_dir}",
        "+callbacks.hold._target_=tests.run_control_helpers.HoldAtStep",
        f"+callbacks.hold.step={hold_step}",
        f"+callbacks.hold.flag={flag}",
    )
    wait_for_file(flag, process)
    return process, log_dir / "train" / "runs" / "held"


def resume(run_dir: Path, *extra: str) -> dict[str, float]:
    """The same command again, in-process: auto-resume from the run directory."""
    return train(compose_config("train", [*RUN, *extra, "run_name=held"], output_dir=run_dir))


def logged(run_dir: Path, name: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric in the run's metrics.csv, in file order."""
    rows = [r for r in read_metrics_csv(run_dir) if r.get(name)]
    return [int(r["step"]) for r in rows], [float(r[name]) for r in rows]


def assert_same_final_metrics(resumed: dict[str, float], expected: dict[str, float]) -> None:
    for name in FINAL:
        assert resumed[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name


def test_sigkilled_run_resumes_to_the_uninterrupted_result(reference, tmp_path: Path) -> None:
    expected, reference_dir = reference
    # held after step 3: the newest checkpoint is step 2, mid-epoch; SIGKILL leaves no chance
    # to clean up. TensorBoard on too: the replayed steps must not show twice there either.
    process, run_dir = start_held_run(tmp_path, 3, TENSORBOARD)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "step_0000002.ckpt").is_file() and not (ckpts / "final.json").exists()
    assert int(torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"]) == 2

    resumed = resume(run_dir, TENSORBOARD)
    assert_same_final_metrics(resumed, expected)
    # the same CSV continues: each metric's rows as in the uninterrupted run, no second version
    for name in ["val/psnr", "train/loss_step", "test/psnr"]:
        steps, values = logged(run_dir, name)
        expected_steps, expected_values = logged(reference_dir, name)
        assert steps == expected_steps, name
        assert values == pytest.approx(expected_values, rel=1e-5), name
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]
    assert_one_tensorboard_run(run_dir, ["val/psnr", "train/loss_step"])
    # what the killed attempt logged after step 2 was moved aside, not lost
    with (run_dir / "csv" / "version_0" / ROLLED_BACK_FILE).open() as file:
        moved_steps = {int(row["step"]) for row in csv.DictReader(file)}
    assert moved_steps and min(moved_steps) >= 2
    assert (ckpts / "final.json").is_file()
    # the throughput counts went on from the checkpoint's: the summary covers all 8 kept steps
    counts = torch.load(ckpts / "last.ckpt", weights_only=True)["callbacks"]["TrainingThroughput"]
    assert (counts["batches"], counts["samples"], counts["tokens"]) == (8, 8 * 64, 8 * 64 * 49)
    assert resumed["summary/steps_per_sec"] == pytest.approx(8 / counts["elapsed"])


SIGUSR1_SLOW = pytest.mark.slow(
    reason="the handler turns SIGUSR1 into the same flag as SIGTERM (tested by default); "
    "another training subprocess costs ~30 s"
)


@pytest.mark.parametrize(
    "signum",
    [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=SIGUSR1_SLOW)],
    ids=["SIGTERM", "SIGUSR1"],
)
def test_preemption_signal_checkpoints_exits_and_resumes(
    signum: signal.Signals, reference, tmp_path: Path
) -> None:
    expected, reference_dir = reference
    # held after step 4, the epoch's last batch, before its validation: the checkpoint is taken
    # there, and the resumed run must still validate epoch 0 before it trains on. Every logger
    # is on, and both attempts must write to the same TensorBoard and W&B runs. The subprocess
    # inherits this process's W&B service (WANDB_SERVICE): the preempted attempt must finish its
    # W&B run itself, or the run id stays taken and the resumed attempt cannot continue it.
    wandb.setup()
    process, run_dir = start_held_run(tmp_path, 4, "logger=many")
    process.send_signal(signum)
    out, err = process.communicate(timeout=300)
    assert process.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "run the same command to resume" in out + err
    last = run_dir / "checkpoints" / "last.ckpt"
    assert int(torch.load(last, weights_only=True)["global_step"]) == 4  # the step it was in
    assert not list(run_dir.glob("checkpoints/.*partial*"))

    assert_same_final_metrics(resume(run_dir, "logger=many"), expected)
    wandb.finish()  # in-process, no Hydra job end finishes the resumed attempt's W&B run
    steps, _ = logged(run_dir, "val/psnr")
    assert steps == logged(reference_dir, "val/psnr")[0]  # epoch 0's validation was not skipped
    assert_one_tensorboard_run(run_dir, ["val/psnr", "train/loss_step"])
    folders = offline_runs(run_dir)  # one W&B folder per attempt, both of the run id
    assert len(folders) == 2 and [summarize(f)["id"] for f in folders] == ["held", "held"]


def assert_one_tensorboard_run(run_dir: Path, names: list[str]) -> None:
    """Both attempts wrote into one TensorBoard run, which reads like the CSV: each metric of
    ``names`` at the CSV's steps, with its values (what the stopped attempt logged at or after
    the resumed step is purged, not shown twice)."""
    (version,) = (run_dir / "tensorboard").iterdir()
    assert version.name == "version_0"
    # events.out.tfevents.<time>.<host>.<pid>.<n>: the stopped process and this one
    writers = {f.name.split(".")[-2] for f in version.glob("events.out.tfevents.*")}
    assert len(writers) == 2
    events = EventAccumulator(str(version))
    events.Reload()
    for name in names:
        steps, values = logged(run_dir, name)
        scalars = events.Scalars(name)
        assert [e.step for e in scalars] == steps, name
        assert [e.value for e in scalars] == pytest.approx(values, rel=1e-6), name


def test_rerunning_a_finished_run_trains_no_further(reference, tmp_path: Path) -> None:
    expected, reference_dir = reference
    run_dir = tmp_path / "again"
    shutil.copytree(reference_dir, run_dir)
    again = train(compose_config("train", [*RUN, "run_name=again"], output_dir=run_dir))
    assert again["test/psnr"] == pytest.approx(expected["test/psnr"], rel=1e-6)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8


def test_throughput_is_logged_and_summarised(reference) -> None:
    metrics, run_dir = reference
    rows = read_metrics_csv(run_dir)
    logged_rates = [r for r in rows if r.get("train/tokens_per_sec")]
    assert logged_rates, "train/tokens_per_sec never logged"
    # 28x28 digits, 4x downsampling: 7x7 latent positions, one VQ codebook = 49 tokens per image
    for row in logged_rates:
        samples, tokens = float(row["train/samples_per_sec"]), float(row["train/tokens_per_sec"])
        assert tokens == pytest.approx(49 * samples, rel=1e-6)
        assert float(row["train/steps_per_sec"]) * 64 == pytest.approx(samples, rel=1e-6)
    # the whole-run averages reach the returned metrics (and the closing table), and are logged
    # once, at the last step
    assert metrics["summary/tokens_per_sec"] == pytest.approx(
        49 * metrics["summary/samples_per_sec"]
    )
    assert metrics["summary/samples_per_sec"] == pytest.approx(
        64 * metrics["summary/steps_per_sec"]
    )
    (row,) = [r for r in rows if r.get("summary/tokens_per_sec")]
    assert int(row["step"]) == 8
    for name in ("steps_per_sec", "samples_per_sec", "tokens_per_sec"):
        assert float(row[f"summary/{name}"]) == pytest.approx(metrics[f"summary/{name}"])


def test_a_step_checkpoint_due_before_a_validation_is_taken_after_it(reference) -> None:
    _, run_dir = reference

    def val_batches_done(name: str) -> int:
        checkpoint = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
        return int(progress["total"]["completed"])  # counted per epoch

    assert val_batches_done("step_0000006.ckpt") == 0  # mid-epoch 1, no validation yet
    # step 8 ends epoch 1, whose validation (2 batches) follows: the checkpoint waited for it
    assert val_batches_done("step_0000008.ckpt") == 2
