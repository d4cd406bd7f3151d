"""Tiny ``Dataset`` adapters that turn stored samples into float ``(C, H, W)`` images in [0, 1]."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ImagesOnly", "UInt8ImageDataset"]


class UInt8ImageDataset(Dataset[Tensor]):
    """In-memory ``uint8`` images ``(N, C, H, W)``; items are float32 in [0, 1]."""

    def __init__(self, images: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                "expected uint8 images of shape (N, C, H, W), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index].to(torch.float32).div_(255.0)


class ImagesOnly(Dataset[Tensor]):
    """Wrap a ``(image, target)`` dataset (e.g. torchvision's) and keep only the image."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tensor:
        return self.dataset[index][0]
