"""What a training phase needs from the run that drives it: :class:`Run`, the opened run's config,
runtime and folder, its metrics log and stop flag, and how it is being driven.

A run is opened by :func:`supcon.runs.open.open_run`; the training loop only uses it, so that
training never imports the run-folder layer above it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from supcon.core.config import Config
from supcon.core.runlog import RunLog
from supcon.core.runtime import Runtime
from supcon.core.stop import StopFlag


@dataclass
class Run:
    """An opened run: its config, runtime and folder, and how it is being driven."""

    cfg: Config
    rt: Runtime
    dir: Path
    resume: bool = False
    progress: bool = True
    stop_after: int | None = None  # stop cleanly (as on SIGTERM) once a phase has this many epochs
    stop: StopFlag = field(default_factory=StopFlag)
    lock: object | None = None

    @functools.cached_property
    def log(self) -> RunLog:
        return RunLog(self.dir, tensorboard=self.cfg.tensorboard)

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    def weights(self, phase: str) -> Path:
        return self.dir / "weights" / f"{phase}.safetensors"

    def close(self) -> None:
        self.log.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
