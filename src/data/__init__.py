"""Datamodules. Image ones yield float32 ``(B, C, H, W)`` batches in [0, 1]; audio ones yield
float32 ``(B, 1, T)`` mono waveforms at their ``sample_rate``. No labels."""

from src.data.asterisk_speech import AsteriskSpeechDataModule
from src.data.audio_folder import AudioFolderDataModule
from src.data.embedded_mnist import EmbeddedMNISTDataModule
from src.data.embedded_photos import EmbeddedPhotosDataModule
from src.data.image_folder import ImageFolderDataModule
from src.data.split_datamodule import SplitImageDataModule
from src.data.torchaudio_speech import TorchaudioSpeechDataModule
from src.data.torchvision_images import TorchvisionImageDataModule

__all__ = [
    "AsteriskSpeechDataModule",
    "AudioFolderDataModule",
    "EmbeddedMNISTDataModule",
    "EmbeddedPhotosDataModule",
    "ImageFolderDataModule",
    "SplitImageDataModule",
    "TorchaudioSpeechDataModule",
    "TorchvisionImageDataModule",
]
