"""Evaluate-continuously: `eval.py watch=<dir>` evaluates each new checkpoint once, in step
order, logs its metrics at its step, and stops at the final marker or when idle."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from eval import evaluate
from src.utils.checkpoint_watch import CheckpointWatcher, WatchDirError, checkpoint_directory
from src.utils.run_controller import write_final_marker
from tests.conftest import compose_config
from tests.helpers import last_logged, read_metrics_csv
from train import train


def save_step(path: Path, step: int) -> None:
    torch.save({"global_step": step}, path)


def test_watcher_evaluates_each_step_once_in_order_then_stops_at_final(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    # what appears between two looks: one poll each, several at once, a duplicate step in
    # last.ckpt, an older step, a file still being written, then the final marker
    arrivals = [
        lambda: save_step(ckpts / "step_0000002.ckpt", 2),
        lambda: (
            save_step(ckpts / "step_0000006.ckpt", 6),
            save_step(ckpts / "step_0000004.ckpt", 4),
        ),
        lambda: (
            save_step(ckpts / "last.ckpt", 6),
            (ckpts / "step_0000008.ckpt").write_bytes(b"PK"),
        ),
        lambda: (save_step(ckpts / "epoch_000.ckpt", 3), save_step(ckpts / "step_0000008.ckpt", 8)),
        lambda: write_final_marker(ckpts, 8, ckpts / "step_0000008.ckpt"),
    ]
    calls: list[tuple[str, int]] = []
    watcher = CheckpointWatcher(ckpts, poll_seconds=1, idle_timeout=100)
    reason = watcher.run(
        lambda path, step: calls.append((path.name, step)),
        clock=lambda: 0.0,
        sleep=lambda _: arrivals.pop(0)(),
    )
    assert reason == "final" and not arrivals
    assert calls == [
        ("step_0000002.ckpt", 2),
        ("step_0000004.ckpt", 4),
        ("step_0000006.ckpt", 6),
        ("step_0000008.ckpt", 8),
    ]


def test_watcher_stops_when_idle(tmp_path: Path) -> None:
    save_step(tmp_path / "last.ckpt", 5)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    calls: list[int] = []
    watcher = CheckpointWatcher(tmp_path, poll_seconds=10, idle_timeout=30)
    assert watcher.run(lambda p, s: calls.append(s), clock=lambda: now[0], sleep=sleep) == "idle"
    assert calls == [5] and now[0] == 30


def test_missing_watch_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WatchDirError, match="watch directory not found"):
        checkpoint_directory(tmp_path / "nope")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert checkpoint_directory(tmp_path / "run") == tmp_path / "run" / "checkpoints"
    cfg = compose_config("eval", [f"watch={tmp_path}/nope"], output_dir=tmp_path / "eval")
    with pytest.raises(WatchDirError):
        evaluate(cfg)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(compose_config("eval", [], output_dir=tmp_path / "eval"))


def test_eval_watch_evaluates_three_checkpoints_written_one_after_another(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=6",
        "+trainer.limit_val_batches=1",
        "test=false",
        "callbacks.periodic_checkpoint.every_n_train_steps=2",
        "callbacks.periodic_checkpoint.save_top_k=-1",
        "callbacks.model_summary=null",
        "extras.print_config=false",
    ]
    trained = train(compose_config("train", overrides, output_dir=run_dir))
    watched = tmp_path / "watched"
    watched.mkdir()

    def write_one_after_another() -> None:
        for step in (2, 4, 6):
            name = f"step_{step:07d}.ckpt"
            shutil.copy(run_dir / "checkpoints" / name, watched / f".{name}.tmp")
            (watched / f".{name}.tmp").rename(watched / name)
            time.sleep(1.0)
        shutil.copy(run_dir / "checkpoints" / "final.json", watched / "final.json")

    writer = threading.Thread(target=write_one_after_another)
    writer.start()
    eval_dir = tmp_path / "eval"
    cfg = compose_config(
        "eval",
        [
            f"watch={watched}",
            "watcher.poll_seconds=0.2",
            "watcher.idle_timeout=120",
            "test=false",
            "+trainer.limit_val_batches=1",
        ],
        output_dir=eval_dir,
    )
    try:
        latest = evaluate(cfg)
    finally:
        writer.join()
    assert json.loads((run_dir / "checkpoints" / "final.json").read_text())["global_step"] == 6
    rows = [r for r in read_metrics_csv(eval_dir) if r.get("val/psnr")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    # the last one is the trained model at its end: the same metric training logged
    assert latest["step"] == 6
    assert last_logged(rows, "val/psnr") == pytest.approx(trained["val/psnr"], abs=1e-4)
    assert float(rows[0]["val/psnr"]) != pytest.approx(float(rows[-1]["val/psnr"]), abs=1e-6)
