"""Counting and indexing as the loss needs them: no host wait on a GPU (``bincount`` and ``unique``
read their output sizes on the host) and a deterministic backward on every device.
"""

from __future__ import annotations

import torch


def count_classes(cls: torch.Tensor, n_cls: int, dtype: torch.dtype) -> torch.Tensor:
    """``bincount(cls, minlength=n_cls)`` as ``dtype``, for ``cls < n_cls``; exact below 2**24 rows.

    ``bincount`` reads the largest value on the host to size its result (a sync on CUDA); the
    bound ``n_cls`` is known, so an ``index_add_`` of ones gives the same counts without one.
    """
    return torch.zeros(n_cls, dtype=dtype, device=cls.device).index_add_(
        0, cls, torch.ones(cls.shape, dtype=dtype, device=cls.device)
    )


def class_index(labels: torch.Tensor) -> torch.Tensor:
    """``torch.unique(labels, return_inverse=True)[1]``: each label's rank among the distinct labels.

    ``unique`` reads its output size on the host (a sync on CUDA); the ranks come from a sort and a
    running count of where the sorted labels change, whose sizes are those of ``labels``. The
    number of classes is then only bounded by ``labels.numel()``, which callers use as the bound.
    """
    sorted_labels, order = torch.sort(labels)
    change = torch.ones_like(sorted_labels, dtype=torch.long)
    change[1:] = sorted_labels[1:] != sorted_labels[:-1]
    return torch.empty_like(change).scatter_(0, order, change.cumsum_(0).sub_(1))


def take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` with a backward that is deterministic on the device, so that runs reproduce.

    The backward of advanced indexing (``index_put_`` with accumulation) is nondeterministic on the
    CPU; ``index_select``'s (``index_add_``) is deterministic there but nondeterministic on CUDA,
    where indexing's sort-based backward is the deterministic one (PyTorch's reproducibility notes).
    """
    return t.index_select(0, idx) if t.device.type == "cpu" else t[idx]
