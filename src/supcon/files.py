"""Atomic file writes: a temporary file in the same folder, renamed into place.

A crash or Ctrl-C mid-write never leaves a truncated checkpoint, weight file or cache behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def umask_mode(mode: int) -> int:
    """``mode`` less the process umask: what a plain ``open``/``mkdir`` would have given.

    tempfile makes private (0600/0700) files and folders; renamed into place as they are, other
    users could not read them.
    """
    umask = os.umask(0o022)
    os.umask(umask)
    return mode & ~umask


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path``; on any failure, remove it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_root() -> Path:
    """The cache folder (downloads, decoded images, compiled kernels): ``$SUPCON_DATA`` if set, else
    ``~/.cache/supcon``."""
    env = os.environ.get("SUPCON_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "supcon"
