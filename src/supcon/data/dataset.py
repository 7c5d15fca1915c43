"""The dataset types every layer above the data uses: :class:`ImageDataset` (uint8 images and
labels of a training and a test set, with class names), :class:`Normalize` (per-channel input
standardisation) and :class:`Split` (a run's training data after its validation split).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

# A dataset as loaders read it, before it becomes an ImageDataset: uint8 images [N, H, W, C] and
# labels of the training and the test set, and the class names.
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]


@dataclass(frozen=True)
class Normalize:
    """Per-channel input standardisation, in [0, 1] units: ``(x - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


# From this training size on, images are real photos: image files go to the on-disk store
# (data.store=auto), whose arrays would not fit in memory and whose crops need their aspect, and a
# ResNet's stem (model.stem=auto) is the ImageNet one, whose 4x reduction suits large images.
PHOTO_SIZE = 64


@dataclass
class ImageDataset:
    name: str
    train_x: torch.Tensor  # uint8 [N, H, W, C]
    train_y: torch.Tensor  # int64 [N], or float32 multi-hot [N, C] (multi-label)
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    norm: Normalize | None = None  # how model inputs are standardised (None: plain [0, 1])
    train_paths: list[str] | None = None  # where each image came from, when it came from a file
    test_paths: list[str] | None = None
    held_out: ImageDataset | None = None  # classes left out of training (data.exclude_classes)
    made_from: str | None = None  # how the images were made from their source, when not as stored

    def __or__(self, fields: dict) -> ImageDataset:
        """The same dataset with some fields set (``data | {"train_paths": ...}``)."""
        return dataclasses.replace(self, **fields)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        """Whether an image carries a set of classes (multi-hot labels [N, C]) rather than one."""
        return self.train_y.dim() == 2

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[3])

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.train_y)} train / {len(self.test_y)} test images, "
            f"{self.image_size}x{self.image_size}x{self.channels}"
            + (f" ({self.made_from})" if self.made_from else "")
            + f", {self.num_classes} classes"
            + (" (multi-label)" if self.multilabel else "")
        )


@dataclass
class Split:
    """The training data of a run, after carving the validation split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
