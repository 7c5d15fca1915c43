"""A memory queue of labelled features for the loss's extra keys (MoCo-style, label-aware).

``LabelQueue(size, dim)`` is a FIFO ring of ``size`` feature rows and their labels. Each step
enqueues the batch's (detached) key features; the oldest rows are overwritten once the ring is
full. ``keys()`` hands the filled part to :func:`supcon.losses.supcon.supcon_loss` as ``keys`` and
``key_labels``. Under ``torch.distributed`` every rank's batch is gathered before it is enqueued,
so all ranks hold the same queue and pass the same keys to the loss (which does not gather them).

The filled count and the write position live on the host (plain ints): reading them never waits
for the device. Empty slots hold label -1 (an all-zero row for multi-hot labels) and are never
returned by ``keys()``.
"""

from __future__ import annotations

import torch

from supcon.core import dist as _dist

__all__ = ["LabelQueue"]


class LabelQueue:
    """FIFO ring of ``size`` features ``[dim]`` with labels: class ids, or ``classes`` multi-hot columns.

    Example (a momentum encoder's keys, one step)::

        queue = LabelQueue(4096, 128, device=device)
        keys, key_labels = queue.keys()
        loss = supcon_loss(feats, y, keys=keys, key_labels=key_labels, gather=True)
        queue.enqueue(momentum_feats, y)  # after the loss: a batch is not its own key
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        classes: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        for name, value in (("size", size), ("dim", dim), ("classes", 1 if classes is None else classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LabelQueue {name} must be an integer >= 1, got {value!r}")
        self.size, self.dim, self.classes = size, dim, classes
        self.features = torch.zeros(size, dim, dtype=dtype, device=device)
        if classes is None:
            self.labels = torch.full((size,), -1, dtype=torch.long, device=device)
        else:
            self.labels = torch.zeros(size, classes, dtype=torch.bool, device=device)
        self.ptr = 0  # the next slot to write
        self.filled = 0  # slots 0 .. filled-1 hold entries

    def __len__(self) -> int:
        return self.filled

    def __repr__(self) -> str:
        extra = "" if self.classes is None else f", classes={self.classes}"
        return f"LabelQueue(size={self.size}, dim={self.dim}{extra}, filled={self.filled})"

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Append ``features`` ``[b, dim]`` (or ``[b, V, dim]``: each view an entry, view-major) and labels.

        ``labels`` are ``[b]`` class ids (``[b, classes]`` multi-hot). Under ``torch.distributed``
        every rank must call it (a collective): the rows of all ranks are appended in rank order.
        When more rows arrive than the queue holds, only the newest ``size`` are kept.
        """
        features, labels = self._check(features, labels)
        if _dist.world_size() > 1:
            sizes = _dist.all_gather_sizes(features.shape[0], features.device)
            features = _dist.all_gather_nograd(features, sizes)
            # Multi-hot rows travel as bytes: not every backend gathers bool tensors.
            labels = _dist.all_gather_nograd(
                labels if self.classes is None else labels.to(torch.uint8), sizes
            )
        b = features.shape[0]
        if b > self.size:
            features, labels, b = features[-self.size :], labels[-self.size :], self.size
        if b == 0:
            return
        slots = torch.arange(self.ptr, self.ptr + b, device=self.features.device) % self.size
        self.features.index_copy_(0, slots, features.to(self.features.device, self.features.dtype))
        labels = labels.to(self.labels.device)
        self.labels.index_copy_(0, slots, labels.long() if self.classes is None else labels != 0)
        self.ptr = (self.ptr + b) % self.size
        self.filled = min(self.size, self.filled + b)

    def _check(self, features: torch.Tensor, labels: torch.Tensor):
        if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError("LabelQueue.enqueue takes tensors: features [b, dim] and labels")
        features = features.detach()
        if features.dim() == 3:  # [b, V, dim]: view-major rows, labels repeated, as the loss flattens
            views = features.shape[1]
            features = features.transpose(0, 1).reshape(-1, features.shape[2])
            labels = labels.repeat(views, *([1] * (labels.dim() - 1)))
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"LabelQueue of dim {self.dim} takes features [b, {self.dim}] or [b, V, {self.dim}], "
                f"got shape {tuple(features.shape)}"
            )
        want = (features.shape[0],) if self.classes is None else (features.shape[0], self.classes)
        if tuple(labels.shape) != want:
            raise ValueError(
                f"LabelQueue labels must have shape {want} for these features, got {tuple(labels.shape)}"
            )
        if self.classes is None and (labels.is_floating_point() or labels.is_complex()):
            raise TypeError(f"LabelQueue labels must be integer class ids, got dtype {labels.dtype}")
        return features, labels.detach() if self.classes is None else labels.detach() != 0

    def keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features ``[filled, dim]``, labels) of the filled slots: the loss's ``keys`` and ``key_labels``.

        Views of the queue's storage, not copies: the loss copies what it keeps, so enqueuing after
        the loss's forward does not change its backward.
        """
        return self.features[: self.filled], self.labels[: self.filled]

    def state_dict(self) -> dict:
        """The queue's contents and position, for a checkpoint (resuming continues exactly)."""
        return {
            "features": self.features.clone(),
            "labels": self.labels.clone(),
            "ptr": self.ptr,
            "filled": self.filled,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; the sizes must match this queue's."""
        features, labels = state["features"], state["labels"]
        if tuple(features.shape) != tuple(self.features.shape) or tuple(labels.shape) != tuple(
            self.labels.shape
        ):
            raise ValueError(
                f"the saved queue holds features {tuple(features.shape)} and labels {tuple(labels.shape)}, "
                f"this one {tuple(self.features.shape)} and {tuple(self.labels.shape)}"
            )
        ptr, filled = int(state["ptr"]), int(state["filled"])
        # Until the ring is full, entries are the slots before the write position.
        if not (0 <= ptr < self.size and 0 <= filled <= self.size and (filled == self.size or ptr == filled)):
            raise ValueError(f"the saved queue position is out of range: ptr {ptr}, filled {filled}")
        self.features.copy_(features)
        self.labels.copy_(labels)
        self.ptr, self.filled = ptr, filled
