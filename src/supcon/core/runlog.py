"""A run folder's metrics log, ``metrics.jsonl``: one JSON line per epoch, written as the epoch ends
and read back by the report, resumes and the benchmarks.

With ``tensorboard``, every number of a record is also a TensorBoard scalar.
"""

from __future__ import annotations

import json
from pathlib import Path

from supcon.core import dist
from supcon.core.errors import UsageError
from supcon.core.files import atomic_write
from supcon.core.schema import field, load_json


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``metrics.jsonl``, each checked (a JSON object with a phase and an epoch).
    A damaged last line is what a kill during an append leaves, and is skipped; any other damaged
    line is a ``UsageError`` naming the file and the line."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    records = []
    for k, (i, line) in enumerate(numbered):
        try:
            record = load_json(line, f"{path} line {i}")
            field(record, "phase", "str", f"{path} line {i}")
            field(record, "epoch", "int", f"{path} line {i}", ge=1)
        except UsageError:
            if k == len(numbered) - 1:
                continue
            raise
        records.append(record)
    return records


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
        text = "".join(json.dumps(r) + "\n" for r in keep)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))
