"""Batches read ahead in background threads, so that reading and cropping overlap the model step.

A phase whose images live on disk (see :mod:`supcon.data.imageset`) gives the loop a ``prepare``
function: the CPU side of a step (read the batch's images from the store, crop and resize them).
:class:`Prefetch` runs it a few steps ahead in threads (Pillow and numpy release the GIL while
they work). Each batch's random crops come from a generator seeded by the run's seed, the phase,
epoch, step and rank: the same crops however the threads are scheduled, and after a resume.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

Prepare = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]


class TrainBatch(NamedTuple):
    idx: torch.Tensor  # this rank's indices into the training set
    x: torch.Tensor | None = None  # its images as ``prepare`` made them (None: the step indexes them)


def default_depth() -> int:
    """Batches in flight: one per CPU, at most 4 (more only holds memory)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


class Prefetch:
    """``take(s)`` returns ``prepare(batch(s), rng(s))``, started ``depth`` steps ahead."""

    def __init__(
        self,
        prepare: Prepare,
        batch: Callable[[int], torch.Tensor],
        seed: Sequence[int],
        steps: int,
        depth: int | None = None,
    ):
        self.prepare, self.batch, self.seed, self.steps = prepare, batch, tuple(seed), steps
        self.depth = depth or default_depth()
        self._pool = ThreadPoolExecutor(self.depth, thread_name_prefix="supcon-data")
        self._pending: dict[int, Future] = {}
        self.wait_seconds = 0.0  # time the step waited for data: the data path's cost

    def _start(self, s: int) -> None:
        if s < self.steps and s not in self._pending:
            rng = np.random.default_rng([*self.seed, s])
            self._pending[s] = self._pool.submit(self.prepare, self.batch(s), rng)

    def take(self, s: int) -> torch.Tensor:
        for t in range(s, s + self.depth):
            self._start(t)
        t0 = time.perf_counter()
        x = self._pending.pop(s).result()
        self.wait_seconds += time.perf_counter() - t0
        return x

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
