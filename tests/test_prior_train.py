"""Stage 2 end to end on a quickly trained default-experiment tokenizer: the data path from the
tokenizer checkpoint to code batches, `train.py experiment=mnist_prior` (metrics, samples,
sample metrics), resume equals uninterrupted, scripts/sample.py (reproducible, decodes through
the tokenizer, refuses a changed or missing tokenizer), and the bad-input errors."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from src.data import EmbeddedMNISTDataModule
from src.data.code_cache import CodeCacheError
from src.data.code_datamodule import CodeDataModule
from src.data.embedded_mnist_labels import load_mnist_5k_labels
from src.models import load_tokenizer
from src.models.load import NotATokenizerError
from src.models.prior_io import TokenizerMismatchError, load_prior, load_prior_tokenizer
from tests.conftest import compose_config
from tests.helpers import QUICK, read_metrics_csv, run_script
from tests.run_control_helpers import start_script, wait_for_file
from train import train

# a small Grok and a short budget: 2 epochs of 3 batches, checkpoints every 2 steps (all kept)
PRIOR = [
    "experiment=mnist_prior",
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "extras.print_config=false",
    "callbacks.model_summary=null",
    "callbacks.periodic_checkpoint.every_n_train_steps=2",
    "callbacks.periodic_checkpoint.save_top_k=-1",
    "callbacks.prior_samples.num_samples=10",
    "callbacks.sample_metrics.num_samples=20",
    "callbacks.sample_metrics.batch_size=20",
    "model.net.hidden_size=32",
    "model.net.intermediate_size=32",
    "model.net.num_hidden_layers=2",
    "model.net.num_attention_heads=2",
    "model.net.num_key_value_heads=1",
    "model.warmup_steps=2",
]
FINAL = ["val/nll", "val/bits_per_token", "test/nll", "test/moe/expert_utilization"]
FINAL += ["test/moe/router_entropy", "sample/fd", "sample/class_accuracy"]


@pytest.fixture(scope="module")
def tokenizer_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of the default experiment (FSQ, 240 codes, 7x7 grid) after 3 steps."""
    run_dir = tmp_path_factory.mktemp("tokenizer_run")
    train(compose_config("train", [*QUICK, "test=false", "+trainer.limit_val_batches=1"], run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def prior_run(tokenizer_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    """Metrics and directory of an uninterrupted prior run (run_name=ref)."""
    run_dir = tmp_path_factory.mktemp("prior_run")
    overrides = [*PRIOR, f"tokenizer_ckpt={tokenizer_ckpt}", "run_name=ref"]
    return train(compose_config("train", overrides, run_dir)), run_dir


def test_code_batches_are_the_tokenizers_codes_and_labels(tokenizer_ckpt: Path, tmp_path) -> None:
    datamodule = CodeDataModule(str(tokenizer_ckpt), codes_dir=str(tmp_path / "codes"))
    tokenizer = load_tokenizer(tokenizer_ckpt)
    keywords = datamodule.model_keywords()
    assert keywords == {
        "tokenizer_ckpt": str(tokenizer_ckpt.resolve()),
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "codebook_sizes": [240],
        "grid": [7, 7],
        "code_scales": None,  # FSQ is not multi-scale
        "num_classes": 10,
        "modality": "image",
        "sample_rate": None,
    }
    images = EmbeddedMNISTDataModule()
    images.setup()
    codes, labels = next(iter(datamodule.val_dataloader()))
    expected = tokenizer.encode_codes(torch.stack([images.data_val[i] for i in range(64)]))
    assert torch.equal(codes, expected)
    rows = images.split_indices["val"][:64].numpy()
    assert torch.equal(labels, torch.from_numpy(load_mnist_5k_labels()[rows]))
    # training batches are shuffled, covering every training item once per epoch
    seen = torch.cat([batch[1] for batch in datamodule.train_dataloader()])
    train_rows = images.split_indices["train"].numpy()
    assert torch.equal(
        seen.sort().values, torch.from_numpy(load_mnist_5k_labels()[train_rows]).sort().values
    )
    assert not torch.equal(seen, torch.from_numpy(load_mnist_5k_labels()[train_rows]))
    # unconditional: labels are -1 and no classes
    unconditional = CodeDataModule(
        str(tokenizer_ckpt), labels=False, codes_dir=str(tmp_path / "codes")
    )
    assert unconditional.model_keywords()["num_classes"] == 0
    assert (next(iter(unconditional.val_dataloader()))[1] == -1).all()


def test_prior_trains_logs_and_samples(prior_run) -> None:
    metrics, run_dir = prior_run
    for name in [*FINAL, "val/perplexity", "sample/fd_real_val", "sample/fd_reconstructions"]:
        assert np.isfinite(metrics[name]), name
    assert metrics["val/bits_per_token"] == pytest.approx(metrics["val/nll"] / np.log(2), rel=1e-5)
    assert metrics["val/perplexity"] == pytest.approx(np.exp(metrics["val/nll"]), rel=1e-5)
    assert 0.0 <= metrics["sample/class_accuracy"] <= 1.0
    # real validation digits are far closer to the test digits than 20 untrained samples are
    assert metrics["sample/fd_real_val"] < metrics["sample/fd"] / 10
    rows = read_metrics_csv(run_dir)
    logged = {k for row in rows for k, v in row.items() if v}
    moe = ["load_balance_loss", "z_loss", "expert_utilization", "router_entropy"]
    for name in [*(f"train/moe/{n}" for n in moe), "val/moe/1/load/7", "train/nll"]:
        assert name in logged, name
    loads = [
        float(rows[-1][f"test/moe/0/load/{e}"])
        for e in range(8)
        if rows[-1].get(f"test/moe/0/load/{e}")
    ]
    assert loads and sum(loads) == pytest.approx(1.0, abs=1e-4)
    grids = sorted((run_dir / "samples").glob("epoch=*.png"))
    assert [p.name for p in grids] == ["epoch=000-step=000003.png", "epoch=001-step=000006.png"]
    assert (run_dir / "checkpoints" / "step_0000002.ckpt").is_file()


def test_resume_equals_uninterrupted(prior_run, tokenizer_ckpt: Path, tmp_path: Path) -> None:
    """A real interruption: train.py in a subprocess, held after step 3 (the newest checkpoint is
    the mid-epoch step 2), SIGKILLed, then the same command with the same run_name resumes it."""
    expected, reference_dir = prior_run
    flag = tmp_path / "held"
    process = start_script(
        "train.py",
        *PRIOR,
        f"tokenizer_ckpt={tokenizer_ckpt}",
        "run_name=held",
        f"paths.log_dir={tmp_path}",
        "+callbacks.hold._target_=tests.run_control_helpers.HoldAtStep",
        "+callbacks.hold.step=3",
        f"+callbacks.hold.flag={flag}",
    )
    wait_for_file(flag, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    run_dir = tmp_path / "prior" / "runs" / "held"
    ckpts = run_dir / "checkpoints"
    assert int(torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"]) == 2
    assert not list((run_dir / "samples").glob("epoch=*.png"))  # killed before any validation
    overrides = [*PRIOR, f"tokenizer_ckpt={tokenizer_ckpt}", "run_name=held"]
    resumed = train(compose_config("train", overrides, run_dir))
    for name in FINAL:
        assert resumed[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    # the CSV continues: every step's training loss and every validation as in the
    # uninterrupted run. (Not the epoch means of training metrics such as train/nll: their
    # torchmetrics state is not in the checkpoint, so the resumed epoch's mean covers only the
    # batches after the resume point; final, validation and test metrics are unaffected.)
    for name in ["train/loss_step", "val/nll"]:
        got = [(r["step"], float(r[name])) for r in read_metrics_csv(run_dir) if r.get(name)]
        ref = [(r["step"], float(r[name])) for r in read_metrics_csv(reference_dir) if r.get(name)]
        assert [s for s, _ in got] == [s for s, _ in ref], name
        assert [v for _, v in got] == pytest.approx([v for _, v in ref], rel=1e-5), name


def test_sample_script_is_reproducible_and_checks_the_tokenizer(prior_run, tmp_path) -> None:
    from scripts.sample import sample

    _, run_dir = prior_run
    ckpt = run_dir / "checkpoints" / "step_0000004.ckpt"
    base = OmegaConf.load(Path(__file__).parents[1] / "configs" / "sample.yaml")
    base.pop("defaults")

    def draw(name: str, **kw) -> bytes:
        cfg = OmegaConf.merge(
            base, {"ckpt_path": str(ckpt), "num_samples": 12, "out": str(tmp_path / name), **kw}
        )
        (path,) = sample(cfg)
        return path.read_bytes()

    first = draw("a.png", seed=3, label=7)
    assert draw("b.png", seed=3, label=7) == first
    assert draw("c.png", seed=4, label=7) != first
    # the grid holds the tokenizer's decoding of the sampled codes
    prior = load_prior(ckpt)
    tokenizer = load_prior_tokenizer(prior.hparams)
    codes = prior.sample_codes(12, torch.full((12,), 7), generator=torch.Generator().manual_seed(3))
    images = tokenizer.decode_codes(codes)
    assert images.shape == (12, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(images, nrow=8, pad_value=1.0)
    expected = (grid * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    png = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))
    assert np.array_equal(png, expected)

    # the command line, as a user runs it
    result = run_script(
        "scripts/sample.py",
        f"ckpt_path={ckpt}",
        "num_samples=4",
        f"out={tmp_path / 'cli.png'}",
        f"hydra.run.dir={tmp_path / 'h'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "cli.png").is_file()

    # a changed or missing tokenizer file is refused, naming the path and fingerprints
    changed = dict(prior.hparams, tokenizer_fingerprint="0" * 64)
    with pytest.raises(
        TokenizerMismatchError, match=r"has changed: its fingerprint is [0-9a-f]{64}"
    ):
        load_prior_tokenizer(changed)
    missing = dict(prior.hparams, tokenizer_ckpt=str(tmp_path / "gone.ckpt"))
    with pytest.raises(
        TokenizerMismatchError, match=r"gone\.ckpt \(fingerprint [0-9a-f]{64}\) is missing"
    ):
        load_prior_tokenizer(missing)


class UnlabelledDigits(EmbeddedMNISTDataModule):
    """The embedded digits without their labels (as image folders and audio are)."""

    def split_labels(self, split: str) -> None:
        return None


def test_bad_input_gives_clear_errors(tokenizer_ckpt: Path, prior_run, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no tokenizer checkpoint: pass tokenizer_ckpt="):
        CodeDataModule(None)
    with pytest.raises(FileNotFoundError, match=r"tokenizer checkpoint not found: .*nowhere\.ckpt"):
        CodeDataModule(str(tmp_path / "nowhere.ckpt"))
    prior_ckpt = prior_run[1] / "checkpoints" / "step_0000002.ckpt"
    with pytest.raises(NotATokenizerError, match="CodePrior model, not a tokenizer"):
        CodeDataModule(str(prior_ckpt), codes_dir=str(tmp_path / "x")).model_keywords()
    unlabelled = CodeDataModule(
        str(tokenizer_ckpt),
        codes_dir=str(tmp_path / "unlabelled"),
        data={"_target_": f"{__name__}.UnlabelledDigits"},
    )
    with pytest.raises(ValueError, match=r"data.labels=true, but .* has no class labels"):
        unlabelled.model_keywords()
    # codes outside the tokenizer's codebook (240 codes) in the cache
    codes_dir = tmp_path / "tampered"
    CodeDataModule(str(tokenizer_ckpt), codes_dir=str(codes_dir)).setup()
    array = np.load(codes_dir / "val_codes.npy")
    array[3, 2, 1, 0] = 250
    np.save(codes_dir / "val_codes.npy", array)
    with pytest.raises(
        CodeCacheError, match=r"val codes do not fit .* slot 0 must lie in \[0, 240\)"
    ):
        CodeDataModule(str(tokenizer_ckpt), codes_dir=str(codes_dir)).setup()
    # train.py: no tokenizer given (Hydra wraps the datamodule's error, message kept)
    with pytest.raises(InstantiationException, match="no tokenizer checkpoint: pass"):
        train(compose_config("train", ["experiment=mnist_prior"], tmp_path / "run"))
