"""Stopping cleanly: SIGINT/SIGTERM become a flag that the training loop checks between steps, and
that long work below the loop (building the image store) checks between its units through
:func:`stop_requested`."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import torch

from supcon.core import dist

_ENTERED: list[StopFlag] = []  # the flags whose ``with`` block runs now, outermost first


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM (or ``--stop-after``) after saving a checkpoint, or an
    image store build after its last finished chunk: ``checkpoint`` is where the progress is kept."""

    def __init__(self, checkpoint: Path):
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint


def stop_requested() -> bool:
    """Whether a stop was asked of a :class:`StopFlag` entered now. For work in lower layers that
    runs long outside the training loop (an image store build can take hours) and is given no flag:
    it asks between two units of work it can resume from, rather than holding the stop back."""
    return any(flag.requested for flag in _ENTERED)


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step, so the step in flight finishes
    and a checkpoint is written. A second Ctrl-C interrupts at once.

    Re-entrant: a repeat over seeds holds one flag for the whole job and each seed's run enters it
    again, so a request that arrives between two seeds' training loops (data loading, evaluation,
    the report) is not lost when one run ends and the next begins."""

    def __init__(self):
        self.requested = False
        self._old: dict[int, object] = {}
        self._depth = 0

    def __enter__(self):
        self._depth += 1
        if self._depth > 1:
            return self
        _ENTERED.append(self)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth > 0:
            return False
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        _ENTERED.remove(self)
        return False

    def requested_anywhere(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """How many ranks were asked to stop, summed on ``device`` (the one the process group's
        backend serves). A collective: every rank must call it at the same point."""
        return dist.all_reduce_sum(torch.tensor(float(self.requested), device=device))
