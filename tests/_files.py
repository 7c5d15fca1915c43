"""Special files for the tests of hostile inputs: things at a path that are not regular files."""

import os
import socket
from pathlib import Path

KINDS = ("fifo", "folder", "socket", "device")


def make_special(path: Path, kind: str, device: str = "/dev/null") -> Path:
    """Put a FIFO, a folder, a bound Unix socket or a symlink to ``device`` at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "device":
        path.symlink_to(device)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return path
