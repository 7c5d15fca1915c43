"""Files and folders as the data layer reads and writes them, under the faults a disk or a user can
produce: special files named where images are expected, a cache folder that is a file, missing or
read-only, a disk that fills, and several processes building the same cache at once.

- :func:`require_regular` / :func:`open_regular`: only regular files are read. Opening a FIFO blocks
  until a writer comes (forever, and deaf to SIGTERM meanwhile), a device may never end.
- :func:`same_files`: which of many listed files are one file on disk (aliases, links).
- :func:`cache_root` / :func:`make_folder`: the cache folder, usable or refused in one line; a
  missing home folder is never created.
- :func:`exclusive` / :func:`try_exclusive`: an OS lock (``flock``) that the kernel releases when
  its holder dies in any way, ``kill -9`` included.
- :func:`allocate`: a file with real disk blocks behind every byte.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from supcon.core.errors import UsageError
from supcon.core.files import default_root

_MAX_MESSAGE = 400  # characters of a foreign error text kept in one of ours


def one_line(e: BaseException | str) -> str:
    """An error's text as one bounded line (tarfile's, for one, spans five lines)."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    text = text or type(e).__name__
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def printable(text: str, limit: int = 200) -> str:
    """``text`` (a path or name from a user's file) safe inside a one-line message: control
    characters escaped, as repr does, and the length bounded."""
    text = str(text)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def warn(message: str) -> None:
    # One plain line: warnings.warn would add the source file, line number and code.
    print(f"supcon: warning: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- regular files


def kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def require_regular(path: str | os.PathLike[str], what: str = "file") -> os.stat_result:
    """``path``'s stat (links followed); anything but a regular file is one line naming it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what} {path} is {kind(st.st_mode)}, not a regular file")
    return st


def open_regular(path: str | os.PathLike[str], what: str = "file") -> BinaryIO:
    """``path`` opened for reading in binary mode, refused unless it is a regular file.

    Opened non-blocking, so that a FIFO swapped in after a check cannot block the open; the file is
    checked on the open descriptor itself (no race), then switched back to blocking reads."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UsageError(f"{what} {path} is {kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def same_files(files: list[tuple[str, str, int, int]]) -> list[list[int]]:
    """Groups (positions, 2 or more) of ``files`` that are one file on disk: the same path twice, a
    link and its target, hard links. Files only alias one another with the same size and mtime, so
    only those are looked up again."""
    by_stamp: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (_, _, size, mtime) in enumerate(files):
        by_stamp[(size, mtime)].append(i)
    groups = []
    for candidates in by_stamp.values():
        if len(candidates) < 2:
            continue
        by_inode: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in candidates:
            with contextlib.suppress(OSError):  # gone meanwhile: the decode will say so
                st = os.stat(files[i][0])
                by_inode[(st.st_dev, st.st_ino)].append(i)
        groups += [g for g in by_inode.values() if len(g) > 1]
    return sorted(groups)


# --------------------------------------------------------------------------- the cache folder


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``cache_dir``, else :func:`supcon.core.files.default_root` (``$SUPCON_DATA``,
    else ``~/.cache/supcon``, refused when the home folder does not exist). Nothing is created here."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return default_root()


def make_folder(folder: Path, what: str = "the data cache folder") -> Path:
    """``folder`` (and its parents) created if missing and checked writable; else one line saying why
    (a parent that is a file, no permission, a read-only file system)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)  # a unique name, no clash
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(
            f"cannot write {what} {folder}: {_why(folder, e)}; set SUPCON_DATA to a writable folder"
        ) from None
    return folder


def _why(folder: Path, e: OSError) -> str:
    # mkdir under a file says "File exists" or "Not a directory": name the file instead.
    for parent in (folder, *folder.parents):
        with contextlib.suppress(OSError):
            if parent.exists() and not parent.is_dir():
                return f"{parent} is a file, not a folder"
            if parent.exists():
                break
    return e.strerror or str(e)


# --------------------------------------------------------------------------- locks


@contextlib.contextmanager
def exclusive(lock_file: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created if needed), waiting for any holder;
    ``waiting`` is said once if we have to wait. The file is removed on release, so lock files do
    not pile up: a waiter that then gets the lock on the removed file sees it and tries again.
    Where the file system has no locks, this says so once and goes on unguarded."""
    said = False
    while True:
        fd = _open_lock(lock_file)
        try:
            if not _lock(fd, lock_file, blocking=False):
                if waiting and not said:
                    print(f"supcon: {waiting}", file=sys.stderr, flush=True)
                    said = True
                _lock(fd, lock_file, blocking=True)
            if _still_named(fd, lock_file):
                break
        except _NoLocks:
            os.close(fd)
            yield
            return
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # removed by its last holder while we waited: lock the new one
    try:
        yield
    finally:
        _release(fd, lock_file)


@contextlib.contextmanager
def try_exclusive(lock_file: Path) -> Iterator[bool]:
    """As :func:`exclusive` without waiting: yields whether the lock was taken (never where the file
    system has no locks: what it guards is then left alone)."""
    try:
        fd = _open_lock(lock_file)
    except UsageError:
        yield False
        return
    try:
        got = _lock(fd, lock_file, blocking=False) and _still_named(fd, lock_file)
    except _NoLocks:
        got = False
    if not got:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        _release(fd, lock_file)


class _NoLocks(Exception):
    pass


def _lock(fd: int, lock_file: Path, *, blocking: bool) -> bool:
    """Whether ``flock`` took the lock (False: held elsewhere, only when not ``blocking``)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            warn(f"cannot lock {lock_file} ({e.strerror}); concurrent builds here are not kept apart")
            raise _NoLocks from None
        raise UsageError(f"cannot lock {lock_file}: {e.strerror or e}") from None
    return True


def _open_lock(lock_file: Path) -> int:
    try:
        return os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise UsageError(f"cannot create the lock file {lock_file}: {e.strerror or e}") from None


def _still_named(fd: int, lock_file: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(lock_file))
    except FileNotFoundError:
        return False


def _release(fd: int, lock_file: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(lock_file)  # while still held: no one can lock this file and think it current
    os.close(fd)


# --------------------------------------------------------------------------- space


class DiskFull(UsageError):
    """No space left for a file the data layer writes."""


def allocated_bytes(path: Path) -> int:
    """Bytes of disk actually allocated to ``path`` (0 if absent): a sparse file's holes are free."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def allocate(path: Path, size: int, what: str = "file") -> None:
    """``path`` at ``size`` bytes with disk blocks behind every byte, or one line saying why not.

    A file made by ``truncate`` is sparse: writing into its holes through a memory map when the disk
    is full kills the process with SIGBUS instead of raising. Blocks reserved up front turn a full
    disk into ENOSPC here."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise UsageError(f"cannot write {what} {path}: {e.strerror or e}") from None
    try:
        if size > 0 and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left on the disk for {what} {path} ({size:,} bytes)") from None
        raise UsageError(f"cannot write {what} {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
