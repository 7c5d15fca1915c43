"""Long-tailed training sets: the exponential profile and the images it keeps.

The profile is the exponential one of Cao et al. 2019 (LDAM-DRW), used by the CIFAR-10-LT and
CIFAR-100-LT benchmarks: class ``c`` of ``C`` keeps ``floor(n_max * (1 / imbalance) ** (c / (C - 1)))``
training images, so class 0 keeps ``n_max`` and the last class ``n_max / imbalance``. Which images
are kept follows the reference code too: a NumPy ``RandomState(0)`` shuffles each class's indices in
turn, class 0 first, and the first ``n_c`` are kept; on the official CIFAR training sets that gives
the very images of the published benchmarks. The test set stays balanced.

The class-frequency groups of the reports (:mod:`supcon.evaluation.longtail`) are cut at
:data:`MANY` and :data:`FEW` training images.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from supcon.core.errors import UsageError
from supcon.data.dataset import ImageDataset
from supcon.data.imageset import take
from supcon.data.labels import refuse

DEFAULT_IMBALANCE = 100.0  # cifar10-lt / cifar100-lt without data.imbalance, as in the benchmarks
MANY, FEW = 100, 20  # many-shot: > MANY images, few-shot: < FEW, medium-shot: the rest


def check_imbalance(imbalance: float) -> float:
    if not (isinstance(imbalance, int | float) and math.isfinite(imbalance) and imbalance >= 1):
        raise UsageError(f"data.imbalance (max/min class count) must be at least 1, got {imbalance}")
    return float(imbalance)


def profile(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Training images per class ``[C]``: ``floor(n_max * (1 / imbalance) ** (c / (C - 1)))``.

    Written as the reference computes it (the factor ``1 / imbalance`` raised to the power), so the
    counts match it to the image: CIFAR-10 at imbalance 100 keeps 5000, 2997, ..., 50 (12,406).
    """
    factor = 1.0 / check_imbalance(imbalance)
    if num_classes < 2:
        return [int(n_max)] * num_classes
    return [int(n_max * factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def class_counts(y: torch.Tensor, num_classes: int) -> list[int]:
    """Images per class ``[C]`` of labels ``y [N]``."""
    return torch.bincount(y.cpu(), minlength=num_classes).tolist()


def subset_indices(y: torch.Tensor, counts: list[int], seed: int = 0) -> torch.Tensor:
    """Indices (sorted, int64) of the images kept: ``counts[c]`` of class ``c``, chosen as the reference
    does (one ``RandomState(seed)`` shuffles each class's indices, class 0 first; the first ones stay)."""
    labels = y.cpu().numpy()
    rng = np.random.RandomState(seed)
    kept = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        if n > len(idx):
            raise UsageError(f"class {c} has {len(idx)} training images; the profile asks for {n}")
        rng.shuffle(idx)
        kept.append(idx[:n])
    return torch.from_numpy(np.sort(np.concatenate(kept))).long()


def long_tailed(data: ImageDataset, imbalance: float | None, name: str | None = None) -> ImageDataset:
    """``data`` with its training set cut to the exponential profile (``None``: the benchmarks' 100).

    ``n_max`` is the smallest class's count, so that every class can supply its share: on a balanced
    set (CIFAR) it is the per-class count, as in the reference (which takes ``N / C``). Class order is
    class index order. A class the profile leaves without images is refused by name.
    """
    if data.multilabel:
        refuse("data.imbalance (a long-tailed cut by class)")
    imbalance = DEFAULT_IMBALANCE if imbalance is None else check_imbalance(imbalance)
    have = class_counts(data.train_y, data.num_classes)
    counts = profile(min(have), data.num_classes, imbalance)
    empty = [c for c, n in enumerate(counts) if n < 1]
    if empty:
        more = f" and {len(empty) - 1} more" if len(empty) > 1 else ""
        raise UsageError(
            f"data.imbalance={imbalance:g} leaves class {empty[0]} ({data.classes[empty[0]]!r}){more} with "
            f"no training images (the head class keeps {min(have)}); use a smaller imbalance or more data"
        )
    keep = subset_indices(data.train_y, counts)
    paths = [data.train_paths[i] for i in keep.tolist()] if data.train_paths is not None else None
    return dataclasses.replace(
        data,
        name=name or f"{data.name}-lt",
        train_x=take(data.train_x, keep),
        train_y=data.train_y[keep],
        train_paths=paths,
    )
