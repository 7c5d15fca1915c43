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


def write_photos(
    root: Path,
    per_class: int = 4,
    seed: int = 0,
    sizes: tuple[int, int] = (20, 60),
    classes=("ant", "bee", "cow"),
) -> Path:
    """A tiny image folder ``root/<class>/<i>.png`` of random RGB images, each side in ``[*sizes)``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        for i in range(per_class):
            path = root / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(*sizes, 2))
            Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return root
