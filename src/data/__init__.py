"""Image datamodules: every loader yields float32 ``(B, C, H, W)`` batches in [0, 1], no labels."""

from src.data.embedded_mnist import EmbeddedMNISTDataModule
from src.data.embedded_photos import EmbeddedPhotosDataModule
from src.data.image_folder import ImageFolderDataModule
from src.data.split_datamodule import SplitImageDataModule
from src.data.torchvision_images import TorchvisionImageDataModule

__all__ = [
    "EmbeddedMNISTDataModule",
    "EmbeddedPhotosDataModule",
    "ImageFolderDataModule",
    "SplitImageDataModule",
    "TorchvisionImageDataModule",
]
