"""Count the operations that make the host wait for the device, on any device (the CPU included).

On CUDA a kernel launch returns at once; an op whose result the host must read (a Python number, an
output size that depends on the data, a copy into CPU memory) blocks until the GPU has caught up.
Such ops are recognised by name at the dispatcher, so the count is the same on the CPU, where no
wait happens, as it would be on a GPU: a CPU test can pin how many a piece of code performs.

Usage::

    from sync_counter import SyncCounter

    with SyncCounter() as c:
        loss = supcon_loss(features, labels)
        loss.backward()
    assert c.total <= 2, c.counts          # c.counts: Counter {"aten::nonzero": 1, ...}
    c.uploads                              # Counter of host-built tensors and host->device copies

API:

- ``SyncCounter(device=None)``: a ``TorchDispatchMode``; use it as a context manager (modes nest).
  ``device``, if given, is the compute device the code is meant to run on (e.g. "cuda"): only ops
  on tensors of that device type count, copies from it to the CPU are syncs and copies from the CPU
  to it are uploads. Without it, the code is taken to run on the CPU in place of an accelerator:
  ops on tensors of every device count (CPU<->device copies cannot occur in a CPU-only run).
- ``counts``: ``collections.Counter`` of op name -> number of syncing calls.
- ``total``: ``sum(counts.values())``.
- ``uploads``: ``Counter`` of tensors built from Python data on the host (``aten::lift_fresh``, what
  ``torch.tensor([...])`` dispatches) and of host->device copies. They do not wait for the GPU's
  queue, but a pageable-memory copy blocks the host for its transfer, and a constant rebuilt on
  every call is avoidable work; they are reported apart from ``total``.
- ``reset()``: zero both counters.

Counted as syncs: ``_local_scalar_dense`` (``.item()``, ``bool()``, ``int()``, ``float()`` of a
tensor), ``Tensor.tolist()`` and ``Tensor.numpy()`` (which do not reach the dispatcher for CPU
tensors, so the counter wraps them while it is active), ``is_nonzero``, ``equal``, ``nonzero``,
every ``unique`` variant, ``bincount`` (its output size is the data's maximum), ``masked_select``,
``repeat_interleave`` with tensor repeats and no ``output_size``, boolean-mask indexing
(``x[mask]``, ``x[mask] = v``: a hidden ``nonzero``), and device->CPU copies. Ops called inside
another op's kernel are not seen (the dispatcher shows only the outer one), which is why masked
indexing is counted by its inputs.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OPS", "SyncCounter"]

SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::is_nonzero",
        "aten::equal",
        "aten::nonzero",
        "aten::argwhere",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::unique_dim_consecutive",
        "aten::bincount",
        "aten::masked_select",
        "aten::masked_scatter",
        "aten::masked_scatter_",
    }
)
_MASK_INDEX_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})
_COPY_OPS = frozenset({"aten::_to_copy", "aten::copy_", "aten::to"})
_READ_METHODS = ("tolist", "numpy")
_BASE_METHODS = {m: getattr(torch._C.TensorBase, m) for m in _READ_METHODS}


def _is_cpu(d) -> bool:
    return torch.device(d).type == "cpu"


class SyncCounter(TorchDispatchMode):
    """Counts device->host synchronising ops (see the module docstring for the API)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.device = None if device is None else torch.device(device)
        self.counts: Counter[str] = Counter()
        self.uploads: Counter[str] = Counter()
        self._reading = 0
        self._saved: dict = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reset(self) -> None:
        self.counts.clear()
        self.uploads.clear()

    def _counts_device(self, t) -> bool:
        return self.device is None or (isinstance(t, torch.Tensor) and t.device.type == self.device.type)

    def _classify(self, name: str, args, kwargs) -> tuple[str | None, str | None]:
        """(sync label, upload label) of one call; None where it is neither."""
        if name in _COPY_OPS or name == "aten::lift_fresh":
            return self._classify_copy(name, args, kwargs)
        if not self._counts_device(args[0] if args else None):
            return None, None
        if name in SYNC_OPS:
            return name, None
        if name == "aten::repeat_interleave":
            # Only the overload on a repeats tensor reaches the dispatcher (the others decompose to
            # it); its output size is the repeats' sum unless given.
            return (name, None) if kwargs.get("output_size") is None else (None, None)
        if name in _MASK_INDEX_OPS:
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            masks = any(
                isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in idx or ()
            )
            return (f"{name}(bool mask)", None) if masks else (None, None)
        return None, None

    def _classify_copy(self, name: str, args, kwargs) -> tuple[str | None, str | None]:
        if name == "aten::lift_fresh":
            return None, name
        if self._reading:  # the copy inside a wrapped tolist()/numpy(), counted there
            return None, None
        if name == "aten::copy_":
            dst, src = args[0], args[1]
            src_dev, dst_dev = src.device, dst.device
        else:
            src = args[0]
            src_dev = src.device
            dst_dev = kwargs.get("device") or src_dev
        if _is_cpu(src_dev) == _is_cpu(dst_dev):
            return None, None
        if _is_cpu(dst_dev) and (self.device is None or torch.device(src_dev).type == self.device.type):
            return f"{name}(to cpu)", None
        return None, f"{name}(to {torch.device(dst_dev).type})"

    def _wrap_read(self, method: str):
        original = getattr(torch.Tensor, method)

        def read(t, *args, **kwargs):
            if self._counts_device(t):
                self.counts[f"Tensor.{method}"] += 1
            self._reading += 1
            try:
                return original(t, *args, **kwargs)
            finally:
                self._reading -= 1

        return original, read

    def __enter__(self):
        self._reading = 0
        self._saved = {}
        for method in _READ_METHODS:
            self._saved[method], wrapper = self._wrap_read(method)
            setattr(torch.Tensor, method, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for method, original in self._saved.items():
                if original is _BASE_METHODS[method]:
                    delattr(torch.Tensor, method)  # back to the inherited C method
                else:
                    setattr(torch.Tensor, method, original)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sync, upload = self._classify(func._schema.name, args, kwargs)
        if sync is not None:
            self.counts[sync] += 1
        if upload is not None:
            self.uploads[upload] += 1
        return func(*args, **kwargs)
