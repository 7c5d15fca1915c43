"""The order of an epoch's training images: a shuffle, or class-rebalanced draws for long-tailed data.

- ``uniform``: a permutation of the training set (every image once), ``torch.randperm``.
- ``class-balanced``: each position draws a class with equal probability, then an image of that
  class uniformly (with replacement): every class is seen equally often (Kang et al. 2020).
- ``sqrt``: as class-balanced, with classes drawn with probability proportional to the square root of
  their image count (square-root sampling, Mahajan et al. 2018; Kang et al. 2020).

An epoch has ``n`` positions in every case, so steps per epoch and schedules do not change. The order
depends only on the labels and the generator: every rank draws the same order from the shared
data-order stream and takes its own share of each global batch, and a resume mid-epoch redraws it
exactly from the generator state saved at the start of the epoch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from supcon.core.errors import UsageError
from supcon.data.labels import refuse

KINDS = ("uniform", "class-balanced", "sqrt")


def class_probabilities(labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Probability ``[C]`` (float64) of drawing each class id ``0..max(labels)``; 0 for absent ones."""
    counts = torch.bincount(labels.cpu()).double()
    if kind == "class-balanced":
        w = (counts > 0).double()
    elif kind == "sqrt":
        w = counts.sqrt()
    elif kind == "uniform":
        w = counts  # a shuffle shows each class in proportion to its images
    else:
        raise UsageError(f"data.sampler must be one of: {', '.join(KINDS)}; got {kind!r}")
    return w / w.sum()


def epoch_order(labels: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Indices ``[n]`` (int64, CPU) into the training set for one epoch, ``n = len(labels)``.

    ``labels [n]`` are class ids. Draws come only from ``generator`` (a CPU generator): the same
    generator state gives the same order.
    """
    n = len(labels)
    if kind == "uniform":
        return torch.randperm(n, generator=generator)
    p = class_probabilities(labels, kind)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    by_class = torch.argsort(labels.cpu(), stable=True)  # image indices grouped by class
    counts = torch.bincount(labels.cpu(), minlength=len(p))
    starts = torch.cumsum(counts, 0) - counts
    u = torch.rand(2, n, generator=generator, dtype=torch.float64)
    # Inverse CDF: the first class whose cumulative probability exceeds u. An absent class adds
    # nothing to the sum, so it is never the first; the clamp catches a sum rounded below u, and
    # the last class id is present (bincount ends there).
    cls = torch.searchsorted(torch.cumsum(p, 0), u[0], right=True).clamp_max(len(p) - 1)
    within = (u[1] * counts[cls]).long().clamp_max(counts[cls] - 1)
    return by_class[starts[cls] + within]


def order_fn(labels: torch.Tensor, kind: str) -> Callable[[torch.Generator], torch.Tensor] | None:
    """A training phase's epoch order (``loop.Phase.order``): None for ``uniform`` (the loop's own
    shuffle, unchanged), else ``generator -> indices [n]`` over the training labels ``[n]``.
    Multi-label data (labels ``[n, C]``) has no class to draw first: only ``uniform``."""
    if labels.dim() == 2 and kind != "uniform":
        refuse(f"data.sampler={kind} (draws a class, then an image of it)")
    if kind == "uniform":
        return None
    labels = labels.cpu()
    class_probabilities(labels, kind)  # an unknown kind fails now, not at the first epoch
    return lambda g: epoch_order(labels, kind, g)
