"""Run folders on disk: where a run goes, whether a folder may be reused, and its config read back.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON line per
epoch), ``results.json``, ``weights/``, ``checkpoints/``, ``report.md`` and plots. While a run
writes into it, the folder is locked (``supcon.runs.lock``): a second writer is refused.
"""

from __future__ import annotations

import time
from pathlib import Path

from supcon.core.config import Config, from_dict, parse_yaml
from supcon.core.errors import UsageError

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
