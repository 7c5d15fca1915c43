"""Run folders: opening one (checks, lock, saved config), its metrics log, and reading it back.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON line per
epoch), ``results.json``, ``weights/``, ``checkpoints/``, ``report.md`` and plots. While a run
writes into it, the folder is locked (``supcon.runlock``): a second writer is refused.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from supcon import dist
from supcon.config import Config, from_dict, parse_yaml, validate
from supcon.errors import UsageError
from supcon.runtime import Runtime, resolve_runtime, seed_everything, tune_cpu
from supcon.stop import StopFlag

# Files a start writes before any training: a folder holding only these is a failed start's stub.
_STUB_FILES = {"config.yaml", ".lock", "views.png", "model.json"}


def default_run_dir(command: str) -> Path:
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def read_config(run_dir: Path) -> Config:
    """The resolved config a run folder was made with."""
    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise UsageError(f"run folder does not exist: {run_dir}")
    if not path.is_file():
        raise UsageError(f"{run_dir} is not a supcon run folder (no config.yaml)")
    return from_dict(parse_yaml(path.read_text(), str(path)))


def config_diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} (saved) vs {b!r} (now)")
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def phase_seconds(run_dir: Path, phases: tuple[str, ...]) -> float:
    """The training seconds a run folder's metrics log records for ``phases``, all epochs summed."""
    return sum(m["seconds"] for m in read_metrics(run_dir) if m.get("phase") in phases and "seconds" in m)


def summary_writer_class():
    """TensorBoard's ``SummaryWriter``, or a UsageError naming the extra that installs it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("tensorboard logging needs tensorboard: pip install 'supcon[tensorboard]'") from None
    return SummaryWriter


class RunLog:
    """``metrics.jsonl``: one JSON line per epoch, appended as the epoch ends (rank 0 writes).

    With ``tensorboard``, every number of a record is also a TensorBoard scalar
    ``<phase>/<key>`` at step ``epoch``, in ``RUN/tensorboard/`` (the writer opens on the first
    record; :meth:`close` flushes it).
    """

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = tensorboard
        self._writer = None

    def epochs(self, phase: str) -> list[dict]:
        return [r for r in read_metrics(self.run_dir) if r.get("phase") == phase]

    def append(self, record: dict) -> None:
        if not dist.is_main():
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UsageError(f"cannot write {self.path}: {e.strerror or e}") from None
        if self.tensorboard:
            self._scalars(record)

    def _scalars(self, record: dict) -> None:
        if self._writer is None:
            self._writer = summary_writer_class()(log_dir=str(self.run_dir / "tensorboard"))
        phase, step = record.get("phase", "run"), record.get("epoch", 0)
        for key, value in record.items():
            if (
                key not in ("phase", "epoch")
                and isinstance(value, int | float)
                and not isinstance(value, bool)
            ):
                self._writer.add_scalar(f"{phase}/{key}", value, step)
        self._writer.flush()  # a record is an epoch: rare enough to flush each time

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def truncate(self, phase: str, epochs: int) -> None:
        """Drop lines of ``phase`` past ``epochs`` (written after the checkpoint a resume starts from)."""
        if not dist.is_main() or not self.path.is_file():
            return
        keep = [
            r for r in read_metrics(self.run_dir) if not (r.get("phase") == phase and r["epoch"] > epochs)
        ]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


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


def _is_stub(run_dir: Path) -> bool:
    """Only what a start writes before training (a start that failed, e.g. on bad data)."""
    return all(p.name in _STUB_FILES for p in run_dir.iterdir())


def check_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to reuse a non-empty run folder unless asked; never delete a folder that isn't a run folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} exists and is not a folder")
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"nothing to resume in {run_dir}: it has no config.yaml")
        return
    if run_dir.is_dir() and any(run_dir.iterdir()) and not _is_stub(run_dir):
        if not overwrite:
            raise UsageError(f"run folder {run_dir} is not empty; use --overwrite to replace it or --resume")
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(
                f"refusing to overwrite {run_dir}: it is not a supcon run folder (no config.yaml)"
            )


def _lock(run_dir: Path):
    """Rank 0 holds the run folder's lock for the life of the run: one writer per folder."""
    from supcon.runlock import RunLock

    return RunLock(run_dir).acquire() if dist.is_main() else None


def _write_start(cfg: Config, run_dir: Path, resume: bool) -> None:
    """Rank 0: clear the folder (a fresh or overwritten run) and write the resolved config."""
    from supcon.runlock import clear_run_folder

    if resume:
        return
    try:
        clear_run_folder(run_dir)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    except OSError as e:
        raise UsageError(f"cannot write run folder {run_dir}: {e.strerror or e}") from None


def open_run(
    cfg: Config,
    run_dir: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    stop_after: int | None = None,
) -> Run:
    """Validate, lock and prepare the run folder (rank 0), resolve the runtime. ``device`` overrides
    ``cfg.device`` for this process only (each rank's own GPU); it is not part of the saved config."""
    validate(cfg)
    if cfg.tensorboard and dist.is_main():
        summary_writer_class()  # missing tensorboard fails now, not after the first epoch
    rt = resolve_runtime(device or cfg.device, cfg.precision, cfg.channels_last, cfg.deterministic)
    lock = _lock(run_dir)
    try:
        check_run_dir(run_dir, overwrite, resume)
        if resume:
            diff = config_diff(read_config(run_dir).to_dict(), cfg.to_dict())
            if diff:
                raise UsageError(f"cannot resume {run_dir}: the config differs in {'; '.join(diff)}")
        dist.barrier()  # every rank has looked at the folder before rank 0 writes into it
        if dist.is_main():
            _write_start(cfg, run_dir, resume)
        dist.barrier()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    seed_everything(cfg.seed, cfg.deterministic)
    if cfg.tune_cpu and rt.device.type == "cpu":
        tune_cpu()
    return Run(cfg, rt, run_dir, resume=resume, progress=progress, stop_after=stop_after, lock=lock)
