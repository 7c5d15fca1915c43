"""CIFAR-10 and CIFAR-100 in the official python format: download, verify, extract safely, parse.

``load_cifar`` returns ``(x_train, y_train, x_test, y_test, classes)``: uint8 images [N, 32, 32, 3]
(RGB, NHWC), int64 labels [N], and the class names (label i is ``classes[i]``).

Where the data come from, in order:

* ``path``: a copy the user already has, either the ``.tar.gz`` archive itself or its extracted
  folder (the batch files directly in ``path`` or in the archive's top folder under it). It is only
  read, never written to: an archive given this way is read in memory, not extracted.
* otherwise the cache folder (``root``, else ``$SUPCON_DATA``, else ``~/.cache/supcon``): the
  archive is downloaded there once (md5-checked, written atomically) and extracted beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from supcon.core.errors import UsageError
from supcon.core.files import umask_mode
from supcon.data.archives import extract, member_name, open_tar, safe_members
from supcon.data.dataset import Arrays
from supcon.data.diskio import cache_root, make_folder, one_line

_CHUNK = 1 << 20
_TIMEOUT_S = 60


@dataclass(frozen=True)
class CifarSpec:
    name: str
    url: str
    md5: str
    folder: str  # the top folder inside the official archive
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str
    num_classes: int

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, self.test, self.meta)


CIFAR: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        name="CIFAR-10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch",
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
    ),
    "cifar100": CifarSpec(
        name="CIFAR-100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train=("train",),
        test="test",
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
    ),
}


def load_cifar(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    url: str | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> Arrays:
    """Load CIFAR-10 or CIFAR-100 (fine labels) as uint8 NHWC arrays.

    ``url``/``md5`` replace the official ones (a mirror, a test server; ``file://`` works too).
    An archive given by ``path`` is checked against ``md5`` only when ``md5`` is passed, since a
    user's own copy may be a legitimate re-pack.
    """
    spec = CIFAR.get(name)
    if spec is None:
        raise UsageError(f"unknown CIFAR dataset {name!r}; choose one of: {', '.join(CIFAR)}")
    if path is not None:
        return _load_user_copy(spec, Path(path).expanduser(), md5)
    return _load_cached(spec, cache_root(root), url, md5, progress)


# --------------------------------------------------------------------------- user-supplied copy


def _load_user_copy(spec: CifarSpec, path: Path, md5: str | None) -> Arrays:
    if not path.exists():
        raise UsageError(f"{spec.name} data path {path} does not exist")
    if path.is_file():
        if md5 is not None:
            actual = _md5_of(path)
            if actual != md5:
                raise UsageError(f"checksum mismatch for {path}: expected md5 {md5}, got {actual}")
        try:
            files = _read_archive(spec, path)
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
        return _parse(spec, files)
    archive = path / PurePosixPath(urllib.parse.urlparse(spec.url).path).name
    if archive.is_file() and _complete_folder(spec, path) is None:
        # A folder holding the downloaded archive (a copy of someone's cache, say): read that.
        return _load_user_copy(spec, archive, md5)
    return _parse(spec, _read_folder(spec, _find_batches(spec, path)))


def _find_batches(spec: CifarSpec, path: Path) -> Path:
    """The folder holding the batch files: ``path`` itself or ``path/<archive top folder>``."""
    candidates = [path, path / spec.folder]
    for folder in candidates:
        if all((folder / f).is_file() for f in spec.files):
            return folder
    # Name what is missing in the candidate that looks most like a copy, so the fix is obvious.
    best = max(candidates, key=lambda d: sum((d / f).is_file() for f in spec.files))
    missing = [f for f in spec.files if not (best / f).is_file()]
    if len(missing) < len(spec.files):
        raise UsageError(f"incomplete {spec.name} copy in {best}: missing {', '.join(missing)}")
    raise UsageError(
        f"{path} is not a {spec.name} copy: expected {', '.join(spec.files)} in it or in "
        f"{path / spec.folder}, or the .tar.gz archive itself"
    )


def _read_folder(spec: CifarSpec, folder: Path) -> dict[str, tuple[Any, str]]:
    """Each batch file's unpickled content, with the name that error messages use for it."""
    out: dict[str, tuple[Any, str]] = {}
    for f in spec.files:
        file = folder / f
        try:
            with open(file, "rb") as fh:
                out[f] = (_unpickle(fh, file), str(file))
        except OSError as e:
            raise UsageError(f"cannot read {file}: {e.strerror or e}") from None
    return out


def _read_archive(spec: CifarSpec, archive: Path) -> dict[str, tuple[Any, str]]:
    """Read the batch files straight out of the archive, streaming once, writing nothing."""
    wanted = {}
    for f in spec.files:
        wanted[f] = f
        wanted[f"{spec.folder}/{f}"] = f
    out: dict[str, tuple[Any, str]] = {}
    with open_tar(archive) as tf:
        for member in safe_members(tf, archive):
            key = wanted.get(member_name(member.name))
            if key is None or not member.isfile():
                continue
            fh = tf.extractfile(member)
            if fh is None:  # not a regular file; safe_members already refused links and devices
                continue
            label = f"{archive}:{member.name}"
            with fh:
                out[key] = (_unpickle(fh, label), label)
    missing = [f for f in spec.files if f not in out]
    if missing:
        raise UsageError(f"{archive} is not a {spec.name} archive: missing {', '.join(missing)}")
    return out


# --------------------------------------------------------------------------- cache + download


def _load_cached(spec: CifarSpec, root: Path, url: str | None, md5: str | None, progress: bool) -> Arrays:
    url = url or spec.url
    md5 = md5 or spec.md5
    archive_name = PurePosixPath(urllib.parse.urlparse(url).path).name or f"{spec.folder}.tar.gz"
    archive = root / archive_name
    extracted = root / _stem(archive_name)

    folder = _complete_folder(spec, extracted)
    if folder is None:
        make_folder(root)
        # A cached archive is trusted only after its checksum, so a half-written or tampered file
        # left by an older version (or by hand) is replaced rather than extracted.
        if not archive.is_file() or _md5_of(archive) != md5:
            _download(url, archive, md5, progress)
        extract(archive, extracted)
        folder = _complete_folder(spec, extracted)
        if folder is None:
            shutil.rmtree(extracted, ignore_errors=True)
            raise UsageError(
                f"{archive} (from {url}) is not a {spec.name} archive: expected {', '.join(spec.files)}"
            )
    return _parse(spec, _read_folder(spec, folder))


def _complete_folder(spec: CifarSpec, extracted: Path) -> Path | None:
    for folder in (extracted / spec.folder, extracted):
        if all((folder / f).is_file() for f in spec.files):
            return folder
    return None


def _stem(name: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name + ".d"


def _md5_of(file: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    try:
        with open(file, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise UsageError(f"cannot read {file}: {e.strerror or e}") from None
    return h.hexdigest()


def _network_error(url: str, reason: object) -> UsageError:
    return UsageError(
        f"could not download {url} ({reason}); download it by hand and pass --data PATH "
        "(the .tar.gz archive or its extracted folder)"
    )


def _download(url: str, dest: Path, md5: str, progress: bool) -> None:
    """Stream ``url`` into a temp file beside ``dest``; rename it into place only if the md5 matches."""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise UsageError(f"cannot write to the data cache folder {dest.parent}: {e.strerror or e}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _stream(url, out, progress, dest.name)
        if actual != md5:
            raise UsageError(f"checksum mismatch for {url}: expected md5 {md5}, got {actual}")
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _stream(url: str, out: IO[bytes], progress: bool, label: str) -> str:
    from tqdm import tqdm

    h = hashlib.md5(usedforsecurity=False)
    try:
        resp = urllib.request.urlopen(url, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise _network_error(url, f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise _network_error(url, e.reason) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _network_error(url, e) from None
    with resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"downloading {label}",
            disable=not progress,
        ) as bar:
            while True:
                try:
                    chunk = resp.read(_CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise _network_error(url, e) from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as e:
                    raise UsageError(f"cannot write the download of {url}: {e.strerror or e}") from None
                h.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise _network_error(url, f"connection closed after {received} of {total} bytes")
    return h.hexdigest()


# --------------------------------------------------------------------------- parsing


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch files but refuses any other global, so a crafted file can't run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # arrays in pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 pickles of bytes objects (protocols 2 and below) go through _codecs.encode.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module.startswith("numpy.core."):
            # numpy 2 renamed numpy.core; import the new name so no deprecation shim is involved.
            with contextlib.suppress(ImportError, AttributeError):
                return getattr(importlib.import_module("numpy._core." + module.split(".", 2)[2]), name)
        return super().find_class(module, name)


def _unpickle(fh: IO[bytes], label: object) -> Any:
    try:
        return _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except UsageError:
        raise
    except (OSError, EOFError, zlib.error, tarfile.TarError) as e:
        raise UsageError(f"cannot read {label}: corrupt or truncated ({one_line(e)})") from None
    except Exception as e:
        raise UsageError(
            f"cannot read {label}: not a CIFAR python batch file ({type(e).__name__}: {one_line(e)})"
        ) from None


def _field(d: Any, key: str, label: str) -> Any:
    # The official files are Python 2 pickles (bytes keys); re-pickled copies may use str keys.
    if isinstance(d, dict):
        for k in (key.encode(), key):
            if k in d:
                return d[k]
    raise UsageError(f"{label} is not a CIFAR python batch file: no {key!r} entry")


def _batch(d: Any, label: str, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(_field(d, "data", label))
    try:
        labels = np.asarray(_field(d, spec.label_key, label), dtype=np.int64)
    except (TypeError, ValueError):
        raise UsageError(f"{label}: labels are not integers") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UsageError(
            f"{label}: expected uint8 data of shape [N, 3072], got {data.dtype} {list(data.shape)}"
        )
    if labels.shape != (data.shape[0],):
        raise UsageError(f"{label}: {data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise UsageError(f"{label}: labels outside 0..{spec.num_classes - 1}")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue, each row-major): to NHWC.
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, labels


def _parse(spec: CifarSpec, files: dict[str, tuple[Any, str]]) -> Arrays:
    train = [_batch(*files[f], spec) for f in spec.train]
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    x_test, y_test = _batch(*files[spec.test], spec)
    meta, meta_label = files[spec.meta]
    names = _field(meta, spec.names_key, meta_label)
    try:
        classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    except (TypeError, UnicodeDecodeError):
        raise UsageError(f"{meta_label}: unreadable class names") from None
    if len(classes) != spec.num_classes:
        raise UsageError(f"{meta_label}: expected {spec.num_classes} class names, got {len(classes)}")
    return x_train, y_train, x_test, y_test, classes
