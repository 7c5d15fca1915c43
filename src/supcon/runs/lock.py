"""One process at a time per run folder.

Two commands with the same ``--out`` would both train into one folder, and ``--overwrite`` against a
run in progress would interleave their files. The lock is an exclusive ``flock`` on the run folder
itself (an open directory descriptor), so it lives exactly as long as the holding process: the
kernel releases it on any exit, SIGKILL included, and it is never stale. ``.lock`` in the folder only
says who holds it, for the message; it never blocks anything on its own.

API::

    with RunLock(run_dir):               # creates run_dir if needed; UsageError if in use
        clear_run_folder(run_dir)        # --overwrite: empty the folder, keep the folder and .lock
        ...train...

    lock = RunLock(run_dir); lock.acquire(); ...; lock.release()

A second acquirer, in this process or another, gets one ``UsageError`` line naming the holder:
``run folder X is in use by pid N on HOST since TIME (supcon ...)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import stat
import sys
import time
from pathlib import Path

from supcon.core.errors import UsageError
from supcon.core.schema import load_json, read_text

LOCK_FILE = ".lock"


class RunLock:
    """An exclusive, non-blocking lock on ``run_dir`` held until ``release()`` or process exit."""

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None
        self._wrote = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise UsageError(f"cannot open run folder {self.run_dir}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"run folder {self.run_dir} is in use by {_holder(self.run_dir)}") from None
        except OSError as e:  # a file system without flock (some network mounts)
            os.close(fd)
            raise UsageError(f"cannot lock run folder {self.run_dir}: {e.strerror or e}") from None
        self._fd = fd
        # Best effort: the lock itself is the flock; this file is only for the message.
        with contextlib.suppress(OSError):
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "command": " ".join([os.path.basename(sys.argv[0]) or "python", *sys.argv[1:]]),
            }
            self._wrote = _write_holder(self.run_dir / LOCK_FILE, json.dumps(info) + "\n")
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        if self._wrote:  # never remove a .lock that is not the file this process wrote
            with contextlib.suppress(OSError):
                (self.run_dir / LOCK_FILE).unlink()
        os.close(self._fd)  # closing the only descriptor drops the flock
        self._fd, self._wrote = None, False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _write_holder(path: Path, text: str) -> bool:
    """Write ``.lock`` only if it is (or becomes) a regular file: a FIFO put there would block the
    write, a link would write elsewhere."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        os.ftruncate(fd, 0)
        os.write(fd, text.encode())
        return True
    finally:
        os.close(fd)


def _holder(run_dir: Path) -> str:
    try:
        info = load_json(read_text(run_dir / LOCK_FILE, LOCK_FILE, max_bytes=1 << 16), LOCK_FILE)
        text = f"pid {info['pid']} on {info['host']} since {info['since']} ({info['command']})"
        return text if len(text) <= 300 else text[:297] + "..."  # a .lock file may be anyone's
    except (UsageError, KeyError, TypeError):
        return "another process (no readable .lock file)"


def clear_run_folder(run_dir: str | os.PathLike[str]) -> None:
    """Delete everything in ``run_dir`` but the folder itself and ``.lock``.

    The folder stays, so a lock held on it (by this process, for ``--overwrite``) stays valid.
    """
    run_dir = Path(run_dir)
    try:
        entries = list(os.scandir(run_dir))
    except OSError as e:
        raise UsageError(f"cannot read run folder {run_dir}: {e.strerror or e}") from None
    for e in entries:
        if e.name == LOCK_FILE:
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
        except OSError as err:
            raise UsageError(f"cannot delete {e.path}: {err.strerror or err}") from None
