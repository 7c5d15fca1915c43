"""Accuracy by class-frequency group for long-tailed training sets.

Reports split the classes by their training counts as the long-tail literature does (Liu et al.
2019): many-shot (more than 100 images), medium-shot (20 to 100) and few-shot (fewer than 20).
"""

from __future__ import annotations

import torch

from supcon.data.dataset import ImageDataset
from supcon.data.longtail import FEW, MANY, class_counts

IMBALANCED_RATIO = 1.5  # max/min training count above which a run reports group accuracies


GROUPS = ("many", "medium", "few")


def is_imbalanced(train_counts: list[int]) -> bool:
    """Whether max/min training count exceeds :data:`IMBALANCED_RATIO` (an empty class counts)."""
    return max(train_counts) > IMBALANCED_RATIO * min(train_counts)


def class_groups(train_counts: list[int]) -> dict[str, list[int]]:
    """Class ids by training count: many (> 100), medium (20 to 100), few (< 20)."""
    groups: dict[str, list[int]] = {g: [] for g in GROUPS}
    for c, n in enumerate(train_counts):
        groups["many" if n > MANY else "few" if n < FEW else "medium"].append(c)
    return groups


def group_accuracy(pred: torch.Tensor, y: torch.Tensor, train_counts: list[int]) -> dict[str, float | None]:
    """Accuracy of predictions ``pred [N]`` against labels ``y [N]``: overall and over the test images of
    each group's classes. A group with no class (or no test image) is ``None``, never 0."""
    pred, y = pred.cpu(), y.cpu()
    hit = pred == y
    out: dict[str, float | None] = {"overall": float(hit.float().mean()) if len(y) else None}
    for group, classes in class_groups(train_counts).items():
        mask = torch.isin(y, torch.tensor(classes, dtype=y.dtype))
        out[group] = float(hit[mask].float().mean()) if bool(mask.any()) else None
    return out


def group_report(pred: torch.Tensor | None, data: ImageDataset, imbalance: float | None) -> dict:
    """``{"group_acc": ...}`` for a result row when the run's training set is long-tailed (``data.imbalance``
    set, or max/min count above 1.5), else ``{}``. Groups follow the training set's counts."""
    if data.multilabel:
        return {}  # its rows report per-class AP instead
    counts = class_counts(data.train_y, data.num_classes)
    if pred is None or (imbalance is None and not is_imbalanced(counts)):
        return {}
    return {"group_acc": group_accuracy(pred, data.test_y, counts)}
