"""Stored images as a dataset's image set: indexed like a uint8 tensor, cropped at their true aspect.

:class:`StoredImages` stands where in-memory datasets hold a uint8 tensor [N, S, S, C]: ``len``,
``shape`` and indexing (``x[i:j]``, ``x[index_tensor]``) give uint8 batches [B, S, S, 3], the
evaluation view of each image. Training reads :meth:`StoredImages.random_crops` instead: random
resized crops with torchvision's ``RandomResizedCrop`` semantics, drawn on each stored image's own
height and width (not on a squashed square), resized to S x S.

Evaluation follows timm's convention: the short side resized to S / 0.875 (the store keeps images
at that short side), then the centre S x S.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from supcon.data.augment import CROP_TRIES, crop_fallback
from supcon.data.store import Store

CROP_PCT = 0.875  # evaluation: centre S x S of the image resized to a short side of S / CROP_PCT


def storage_side(image_size: int) -> int:
    """The short side images are stored at for training at ``image_size`` (256 for 224)."""
    return round(image_size / CROP_PCT)


class StoredImages:
    """Images ``ids`` of a store, seen at ``size`` x ``size`` (see the module docstring)."""

    dtype = torch.uint8

    def __init__(self, store: Store, ids: np.ndarray, size: int):
        self.store, self.ids, self.size = store, np.asarray(ids, dtype=np.int64), int(size)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"StoredImages({len(self)} images at {self.size}px from {self.store.path})"

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.size, self.size, 3))

    def subset(self, index) -> StoredImages:
        """A view of some of the images (no pixels read)."""
        return StoredImages(self.store, self.ids[_positions(index, len(self))], self.size)

    def __getitem__(self, index) -> torch.Tensor:
        """The evaluation view (centre crop) of the indexed images: uint8 [B, S, S, 3]."""
        if isinstance(index, int | np.integer):
            return self[[int(index)]][0]
        ids = self.ids[_positions(index, len(self))]
        out = np.empty((len(ids), self.size, self.size, 3), dtype=np.uint8)
        s = self.size
        for row, i in enumerate(ids):
            img = self.store.image(int(i))
            top, left = int(round((img.shape[0] - s) / 2.0)), int(round((img.shape[1] - s) / 2.0))
            out[row] = img[top : top + s, left : left + s]
        return torch.from_numpy(out)

    def random_crops(
        self,
        index,
        rng: np.random.Generator,
        views: int = 1,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> torch.Tensor:
        """``views`` random resized crops of each indexed image: uint8 [views * B, S, S, 3], view-major
        (row ``v * B + b`` is view ``v`` of image ``b``), as the augmentation lays views out."""
        from PIL import Image

        ids = self.ids[_positions(index, len(self))]
        s = self.size
        out = np.empty((views, len(ids), s, s, 3), dtype=np.uint8)
        for b, i in enumerate(ids):
            img = self.store.image(int(i))
            pil = Image.frombuffer("RGB", (img.shape[1], img.shape[0]), img, "raw", "RGB", 0, 1)
            for v in range(views):
                top, left, h, w = crop_box(img.shape[0], img.shape[1], rng, scale, ratio)
                box = (left, top, left + w, top + h)
                out[v, b] = np.asarray(pil.resize((s, s), Image.Resampling.BILINEAR, box=box))
        return torch.from_numpy(out.reshape(views * len(ids), s, s, 3))


def crop_box(
    height: int, width: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, h, w) drawn as torchvision's ``RandomResizedCrop.get_params``: an area share in
    ``scale`` and a log-uniform aspect ratio in ``ratio``, 10 tries, then the centre-crop fallback."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    h, w = crop_fallback(height, width, ratio)
    return (height - h) // 2, (width - w) // 2, h, w


def _positions(index, n: int) -> np.ndarray:
    if isinstance(index, slice):
        return np.arange(n)[index]
    if isinstance(index, torch.Tensor):
        index = index.cpu().numpy()
    index = np.asarray(index)
    if index.dtype == bool:
        if index.shape != (n,):
            raise IndexError(f"a boolean index of shape {index.shape} for {n} images")
        return np.flatnonzero(index)
    return index.astype(np.int64, copy=False).reshape(-1)


def take(images, index):
    """The images at ``index`` as the same kind of set: a view of stored images, a tensor slice of
    in-memory ones."""
    return images.subset(index) if isinstance(images, StoredImages) else images[index]
