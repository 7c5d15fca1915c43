"""Reading tar archives safely: members checked before anything is written, extraction into a
temporary folder renamed into place (so the destination is whole or absent), corrupt archives
reported as one line."""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from supcon.core.errors import UsageError
from supcon.core.files import umask_mode
from supcon.data.diskio import one_line


def member_name(name: str) -> str:
    # Archives made with ``tar -C dir .`` prefix every member with "./"; it means the same file.
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def unsafe_reason(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "'..' in its path"
    if member.issym() or member.islnk():
        return "link"
    if not (member.isfile() or member.isdir()):
        return "device, fifo or other special file"
    return None


@contextlib.contextmanager
def open_tar(archive: Path) -> Iterator[tarfile.TarFile]:
    try:
        with tarfile.open(archive, "r:*") as tf:
            yield tf
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise UsageError(f"cannot read archive {archive}: corrupt or truncated ({one_line(e)})") from None
    except OSError as e:
        # gzip reports bad data as OSError without an errno (BadGzipFile); an errno means the
        # system refused something (a full disk while extracting, say), which is not corruption.
        if e.errno is not None:
            raise
        raise UsageError(f"cannot read archive {archive}: corrupt or truncated ({one_line(e)})") from None


def safe_members(tf: tarfile.TarFile, archive: Path) -> Iterator[tarfile.TarInfo]:
    for member in tf:
        reason = unsafe_reason(member)
        if reason is not None:
            raise UsageError(f"refusing archive {archive}: member {member.name!r} is unsafe ({reason})")
        yield member


def extract(archive: Path, dest: Path) -> None:
    """Extract into a temp folder beside ``dest``, then rename, so ``dest`` is whole or absent."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    except OSError as e:
        raise UsageError(f"cannot write to the data cache folder {dest.parent}: {e.strerror or e}") from None
    try:
        with open_tar(archive) as tf:
            # Check every member before writing any: a refused archive leaves nothing behind.
            members = list(safe_members(tf, archive))
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, members=members, filter="data")
            else:  # Pythons before 3.10.12/3.11.4: the member check above is the whole defence
                tf.extractall(tmp, members=members)
        os.chmod(tmp, umask_mode(0o777))
        if dest.exists():
            # A previous extraction was interrupted or is incomplete: replace it.
            shutil.rmtree(dest)
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process finished the same extraction first; its copy is as good as ours.
            if not dest.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"cannot extract {archive} into {dest.parent}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
