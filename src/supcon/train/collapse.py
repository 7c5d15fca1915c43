"""Collapse of a contrastive embedding, and the warning that names it.

A contrastive loss pulls together the rows that should be together (a sample's views; with labels,
samples that share one) and pushes the others, the negative pairs, apart. When all projections end
up at one point instead, the loss sits on a plateau and the embedding separates nothing. This was
measured on densely labelled multi-label data, where most pairs share a label (README, "Messy
labels"). The sign is the mean cosine similarity of the negative pairs: it is close to
1 once the projections have collapsed, and clearly lower in runs that learn (docs/collapse.md).
"""

from __future__ import annotations

import math
import sys

import torch

from supcon.losses.indexing import count_classes

COLLAPSED = 0.98  # mean cosine similarity of negative pairs above which an epoch counts as collapsed
_ROWS = 1024  # rows of the pairwise label overlap at a time (multi-label)


def negative_similarity(z: torch.Tensor, labels: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """The sum of the cosine similarities of a batch's negative pairs, and their number, ``[2]``.

    ``z`` ``[B, V, D]``: ``V`` views of ``B`` samples. ``labels``: ``[B]`` class indices below
    ``num_classes``, ``[B, C]`` multi-hot rows (a pair is negative when the two label sets do not
    meet), or None (SimCLR: every other sample is a negative). Ordered pairs ``(i, j)``, ``i != j``;
    single labels take O(B * V * D) from per-class sums of the normalised rows.
    """
    b, v, d = z.shape
    zn = torch.nn.functional.normalize(z.detach().float().reshape(b * v, d), dim=1)
    if labels is not None and labels.dim() == 2:
        return _multilabel(zn, labels.float().repeat_interleave(v, dim=0))
    if labels is None:
        groups, n_groups = torch.arange(b, device=z.device), b
    else:
        groups, n_groups = labels, num_classes
    groups = groups.repeat_interleave(v)
    sums = zn.new_zeros(n_groups, d).index_add_(0, groups, zn)
    counts = count_classes(groups, n_groups, zn.dtype)
    total = zn.sum(dim=0).square().sum() - sums.square().sum()  # all pairs less same-group pairs
    return torch.stack([total, float(b * v) ** 2 - counts.square().sum()])


def _multilabel(zn: torch.Tensor, hot: torch.Tensor) -> torch.Tensor:
    out = zn.new_zeros(2)
    for r0 in range(0, zn.shape[0], _ROWS):
        negative = (hot[r0 : r0 + _ROWS] @ hot.T) == 0  # label sets that do not meet
        negative[:, r0 : r0 + _ROWS].diagonal().fill_(False)
        sims = zn[r0 : r0 + _ROWS] @ zn.T
        out += torch.stack([(sims * negative).sum(), negative.sum().to(zn.dtype)])  # no mask index: no sync
    return out


def warn_if_collapsed(phase: str, history: list[dict], record: dict, warmup_epochs: float = 0.0) -> bool:
    """Print one warning line the first judged epoch whose negative pairs are as similar as
    :data:`COLLAPSED`; True when it did.

    Judged are the epochs after the first and after the learning-rate warm-up: a freshly built
    network maps every image to nearly one point, and at warm-up's small steps it has not yet
    moved away (the paper's ResNet-50 recipe reads 0.99 at epoch 2 of its 10 warm-up epochs and
    0.95 at epoch 3, a run that learns).
    """
    cos = record.get("neg_cos")
    first = max(2, math.ceil(warmup_epochs) + 1)
    if cos is None or cos < COLLAPSED or record["epoch"] < first:
        return False
    if any(r.get("neg_cos", 0.0) >= COLLAPSED and r["epoch"] >= first for r in history):
        return False  # said already
    print(
        f"supcon: warning: {phase} epoch {record['epoch']}: the projections have collapsed (pairs that "
        f"should be apart have mean cosine similarity {cos:.3f}); the embedding separates little. "
        "A higher loss.temperature may help",
        file=sys.stderr,
        flush=True,
    )
    return True
