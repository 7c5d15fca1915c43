"""Atomic file writes: a temporary file in the same folder, renamed into place.

A crash or Ctrl-C mid-write never leaves a truncated checkpoint, weight file or cache behind.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from supcon.core.errors import UsageError


def umask_mode(mode: int) -> int:
    """``mode`` less the process umask: what a plain ``open``/``mkdir`` would have given.

    tempfile makes private (0600/0700) files and folders; renamed into place as they are, other
    users could not read them.
    """
    umask = os.umask(0o022)
    os.umask(umask)
    return mode & ~umask


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path``; on any failure, remove it.

    The file at ``path`` is replaced only by a complete new one. An ``OSError`` (disk full, read-only
    file system, no permission, a parent that is a file, a name too long) becomes one ``UsageError``
    line naming ``path`` and the reason.
    """
    path = Path(path)
    check_regular_output(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The writer's pid in the name: remove_stale_temps can tell a dead writer's leftover.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        _call_writer(write, tmp)
        os.chmod(tmp, umask_mode(0o666))
        _fsync(tmp)  # the data is on disk before the rename makes it the file (a power loss)
        os.replace(tmp, path)
        _fsync(path.parent, folder=True)
    except OSError as e:
        _remove(tmp)
        raise UsageError(f"cannot write {path}: {_reason(path, e)}") from None
    except BaseException:
        _remove(tmp)
        raise


# How writers that are not Python file objects report a file system error: Rust's io::Error in
# safetensors ("IoError(Os { code: 28, ... })", "(os error 28)").
_ERRNO_IN_TEXT = re.compile(r"(?:os error |Os \{ code: )(\d+)")


def _call_writer(write: Callable[[str], object], tmp: str) -> None:
    """``write(tmp)`` with the write failures of libraries that do not raise ``OSError`` turned into
    one: PyTorch's zip writer on a full disk raises ``RuntimeError: [enforce fail at
    inline_container.cc] ... unexpected pos``, safetensors a ``SafetensorError`` holding the errno."""
    try:
        write(tmp)
    except OSError:
        raise
    except Exception as e:
        text = str(e)
        match = _ERRNO_IN_TEXT.search(text)
        if match:
            code = int(match[1])
        elif "inline_container" in text and ("unexpected pos" in text or "write" in text.lower()):
            code = errno.ENOSPC if "unexpected pos" in text or _nearly_full(tmp) else errno.EIO
        else:
            raise
        raise OSError(code, os.strerror(code)) from None


def _nearly_full(tmp: str) -> bool:
    try:
        return shutil.disk_usage(os.path.dirname(tmp) or ".").free < (1 << 20)
    except OSError:
        return False


def check_regular_output(path: Path) -> None:
    """``UsageError`` when ``path`` exists and is not a regular file (or a link to one): a device node,
    FIFO, socket or folder is never replaced by an output."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there yet; a bad parent is said later
        return
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a special file (device, FIFO or socket)"
        raise UsageError(f"refusing to write {path}: it exists and is {kind}, not a regular file")


def _fsync(path: str | Path, folder: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    except OSError:
        if folder:  # some file systems cannot open folders for sync: the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)


def default_root() -> Path:
    """The cache folder (downloads, decoded images, compiled kernels): ``$SUPCON_DATA`` if set, else
    ``~/.cache/supcon``. Nothing is created here, and a home folder that does not exist is refused
    (:func:`existing_home`): a wrong ``$HOME`` must not leave folders at the root of the file system."""
    env = os.environ.get("SUPCON_DATA")
    return Path(env).expanduser() if env else existing_home() / ".cache" / "supcon"


def existing_home() -> Path:
    """The home folder, which must exist: else one line saying to set ``SUPCON_DATA``."""
    try:
        home = Path.home()
    except (RuntimeError, KeyError) as e:  # no $HOME and no password entry
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(f"no home folder for the cache ({reason}); set SUPCON_DATA") from None
    if not home.is_dir():
        raise UsageError(
            f"the home folder {home} does not exist (or is not a folder), so the cache ~/.cache/supcon "
            "cannot be made there; set SUPCON_DATA to a writable folder"
        )
    return home


def matplotlib_outside_missing_home() -> None:
    """Process side effect: point ``MPLCONFIGDIR`` at a new private temporary folder (removed at exit)
    when the home folder does not exist and ``MPLCONFIGDIR`` is unset. Call it before matplotlib is
    imported: matplotlib creates ``~/.cache/matplotlib`` and ``~/.config/matplotlib`` itself, missing
    home folder and all, and a wrong ``$HOME`` must not leave folders at the root of the file system."""
    if os.environ.get("MPLCONFIGDIR"):
        return
    try:
        existing_home()
    except UsageError:
        folder = tempfile.mkdtemp(prefix="supcon-matplotlib-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["MPLCONFIGDIR"] = folder


def _remove(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _reason(path: Path, e: OSError) -> str:
    # mkdir on an existing non-folder says "File exists", which hides the actual problem.
    for parent in (path.parent, *path.parent.parents):
        with contextlib.suppress(OSError):
            if parent.exists() and not parent.is_dir():
                return f"{parent} is not a folder"
            if parent.exists():
                break
    return e.strerror or str(e) or type(e).__name__


def remove_stale_temps(folder: Path, name: str = "*", *, all_dead: bool = False) -> list[Path]:
    """Remove ``atomic_write``'s temporary files for ``name`` (a glob) in ``folder`` whose writer is gone.

    A kill during a write leaves ``.<name>.<pid>.<random>.tmp`` behind. Files whose pid is no live
    process are removed; with ``all_dead`` (the caller holds the folder's run lock, so no one else
    writes there) every such file is, including those of older versions, which had no pid.
    Returns the removed paths.
    """
    removed = []
    for tmp in Path(folder).glob(f".{name}.*.tmp"):
        fields = tmp.name[: -len(".tmp")].rsplit(".", 2)
        pid = int(fields[1]) if len(fields) == 3 and fields[1].isdigit() else None
        if all_dead or (pid is not None and pid != os.getpid() and not _alive(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True
