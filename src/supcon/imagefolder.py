"""Image-folder datasets: ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` decoded to uint8 arrays.

``load_imagefolder`` returns ``(x_train, y_train, x_test, y_test, classes)``: uint8 images
[N, H, W, 3] (RGB, NHWC), int64 labels [N], and the class names (label i is ``classes[i]``, the
sorted names of the class folders under ``train``).

Decoding tens of thousands of small files costs seconds, so the decoded arrays are cached in one
``.npz`` file under ``<cache>/imagefolder/``, keyed by the folder's resolved path, every image's
relative path, size and modification time, the requested image size and a format version: any
added, removed or rewritten image, or another ``image_size``, means a fresh decode. The data
folder itself is only read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from supcon.errors import UsageError
from supcon.files import atomic_write, default_root

RawSplit = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Bump when the decoded pixels would differ for the same files (resize method, mode handling, ...),
# so that caches written by an older version are not reused.
FORMAT_VERSION = 1

# Below this many images a pool of decoding threads costs more than it saves.
_POOL_MIN_FILES = 4096
_CHUNK = 512

_File = tuple[str, str, int, int]  # absolute path, path relative to the data folder, size, mtime_ns


def load_imagefolder(
    path: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> RawSplit:
    """Read an image folder, from the decode cache when nothing changed since the last read.

    Every image must have the same size unless ``image_size`` is given, in which case each is resized
    (bilinear, after a cheap power-of-two reduction for large images) to ``image_size`` x ``image_size``.
    ``workers``: decode processes; None picks one a CPU (at most 8), 0 or 1 decodes in this process.
    """
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise UsageError(f"image size must be a positive whole number of pixels, got {image_size!r}")
    root = check_root(path)
    if not root.is_dir():
        raise UsageError(
            f"data path {root} is not a folder (expected {root}/train/<class>/ and {root}/test/<class>/)"
        )
    classes = _classes(root)
    train = [_list_class(root, "train", c) for c in classes]
    test = [_list_class(root, "test", c) for c in classes]
    return decode_files(
        root, classes, _flat(train), _labels(train), _flat(test), _labels(test),
        image_size=image_size, cache_dir=cache_dir, progress=progress, workers=workers,
    )  # fmt: skip


def decode_files(
    root: Path,
    classes: list[str],
    train: list[_File],
    y_train: np.ndarray,
    test: list[_File],
    y_test: np.ndarray,
    *,
    image_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> RawSplit:
    """Decode listed files into arrays, from the decode cache when nothing changed since the last read."""
    cache_file = _cache_file(root, cache_dir, image_size, train + test, np.concatenate([y_train, y_test]))
    cached = _read_cache(cache_file, classes)
    if cached is not None:
        return cached
    x = _decode_all(
        train + test, image_size, progress=progress, workers=workers, desc=f"decoding {root.name}"
    )
    out = (
        x[: len(train)],
        np.asarray(y_train, np.int64),
        x[len(train) :],
        np.asarray(y_test, np.int64),
        classes,
    )
    _write_cache(cache_file, root, out)
    return out


def check_root(path: str | os.PathLike[str]) -> Path:
    """The resolved data path; a missing or unreadable one is one line naming it."""
    root = Path(path).expanduser()
    try:
        is_dir = root.is_dir()
        exists = is_dir or os.path.lexists(root)
        if exists and not is_dir:
            os.stat(root)  # a link loop or a dangling link: say so, not "not a folder"
    except OSError as e:
        raise UsageError(f"cannot read data path {root}: {e.strerror or e}") from None
    if not exists:
        raise UsageError(f"data folder {root} does not exist")
    return root.resolve()


def _flat(per_class: list[list[_File]]) -> list[_File]:
    return [f for files in per_class for f in files]


def _labels(per_class: list[list[_File]]) -> np.ndarray:
    return np.repeat(np.arange(len(per_class), dtype=np.int64), [len(c) for c in per_class])


# --------------------------------------------------------------------------- listing


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _subfolders(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if _visible(e.name) and e.is_dir())
    except OSError as e:  # unreadable, a name too long, a link loop
        raise UsageError(f"cannot read folder {folder}: {e.strerror or e}") from None


def _classes(root: Path) -> list[str]:
    layout = f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image>"
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UsageError(f"data folder {root} has no {split}/ subfolder; {layout}")
    classes = _subfolders(root / "train")
    if not classes:
        raise UsageError(f"{root / 'train'} has no class folders; {layout}")
    if len(classes) < 2:
        raise UsageError(
            f"{root / 'train'} has only one class folder ({classes[0]}); a classifier needs 2 or more"
        )
    test_classes = _subfolders(root / "test")
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        diff = "; ".join(
            f"only in {split}: {', '.join(names)}"
            for split, names in (("train", only_train), ("test", only_test))
            if names
        )
        raise UsageError(f"the class folders of {root / 'train'} and {root / 'test'} differ: {diff}")
    return classes


def _list_class(root: Path, split: str, cls: str) -> list[_File]:
    """The class's images (sub-folders included), sorted, with the size and mtime the cache key uses."""
    out: list[_File] = []
    folder = root / split / cls
    # A stack, not recursion: deeply nested folders must not hit Python's recursion limit. Entries
    # are pushed in reverse so that they come off in name order, a sub-folder's files in its place.
    stack: list[tuple[str, str, bool]] = [(str(folder), f"{split}/{cls}/", True)]
    while stack:
        path, rel, is_dir = stack.pop()
        if not is_dir:
            try:
                st = os.stat(path)
            except OSError as e:  # gone or unreadable meanwhile
                raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
            out.append((path, rel, st.st_size, st.st_mtime_ns))
            continue
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise UsageError(f"cannot read folder {path}: {e.strerror or e}") from None
        for e in reversed(entries):
            if not _visible(e.name):
                continue
            try:
                # Symlinked sub-folders are not followed: a link cycle would never end.
                if e.is_dir(follow_symlinks=False):
                    stack.append((e.path, f"{rel}{e.name}/", True))
                elif e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                    stack.append((e.path, rel + e.name, False))
            except OSError as err:  # a link loop, say
                raise UsageError(f"cannot read {e.path}: {err.strerror or err}") from None
    if not out:
        raise UsageError(f"class folder {folder} has no images ({' '.join(IMAGE_EXTENSIONS)})")
    return out


# --------------------------------------------------------------------------- cache


def _cache_file(
    root: Path, cache_dir: str | os.PathLike[str] | None, image_size: int | None, files: list[_File], labels
) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_root()
    lines = [f"supcon imagefolder v{FORMAT_VERSION}", str(root), f"image_size={image_size}"]
    lines += [f"{rel}\t{size}\t{mtime}\t{y}" for (_, rel, size, mtime), y in zip(files, labels, strict=True)]
    key = hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    # The folder's own hash first, so a newer cache of the same folder can replace older ones.
    folder_hash = hashlib.sha256(str(root).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return base / "imagefolder" / f"{folder_hash}-{key}.npz"


def _read_cache(file: Path, classes: list[str]) -> RawSplit | None:
    try:
        # Our own handle: np.load leaks the one it opens when the file is not a valid archive.
        with open(file, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            x_train, y_train, x_test, y_test = (z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
            cached_classes = [str(c) for c in z["classes"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # unreadable (disk trouble, an older layout): decode again and overwrite it
    ok = (
        cached_classes == classes
        and x_train.dtype == np.uint8
        and x_test.dtype == np.uint8
        and x_train.ndim == 4
        and x_train.shape[1:] == x_test.shape[1:]
        and x_train.shape[-1] == 3
        and y_train.shape == (len(x_train),)
        and y_test.shape == (len(x_test),)
    )
    if not ok:
        return None
    return x_train, y_train.astype(np.int64, copy=False), x_test, y_test.astype(np.int64, copy=False), classes


def _write_cache(file: Path, data_root: Path, split: RawSplit) -> None:
    """Best effort: a cache that can't be written costs the next run time, not this run its data."""
    folder = file.parent
    with contextlib.suppress(OSError):
        if folder.resolve().is_relative_to(data_root):
            _warn(f"not caching decoded images: cache folder {folder} is inside the data folder {data_root}")
            return
    x_train, y_train, x_test, y_test, classes = split

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(
                f,
                x_train=x_train,
                y_train=y_train,
                x_test=x_test,
                y_test=y_test,
                classes=np.array(classes, dtype=str),
            )

    try:
        atomic_write(file, write)
    except UsageError as e:
        _warn(f"could not cache decoded images: {e}")
        return
    # Caches of earlier states of the same folder are dead weight (each can be hundreds of MB).
    prefix = file.name.split("-", 1)[0] + "-"
    for old in folder.glob(f"{prefix}*.npz"):
        if old != file:
            with contextlib.suppress(OSError):
                old.unlink()


def _warn(message: str) -> None:
    # One plain line: warnings.warn would add the source file, line number and code.
    print(f"supcon: warning: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- decoding


def _decode_all(
    files: list[_File], image_size: int | None, *, progress: bool, workers: int | None, desc: str
) -> np.ndarray:
    from tqdm import tqdm

    if image_size is not None:
        h = w = image_size
    else:
        w, h = _image_size(files[0][0])
    out = _allocate(len(files), h, w)
    paths = [f[0] for f in files]
    # The first image sets the size when image_size is None; mismatches name it.
    first = paths[0]
    jobs = [  # each thread decodes straight into its own slice of ``out``
        (paths[start : start + _CHUNK], out[start : start + _CHUNK], image_size, first)
        for start in range(0, len(paths), _CHUNK)
    ]
    with tqdm(total=len(paths), unit="img", desc=desc, disable=not progress) as bar:
        for n, error in run_threads(_decode_job, jobs, _worker_count(workers, len(paths))):
            if error is not None:
                raise UsageError(error)
            bar.update(n)
    return out


def run_threads(fn, jobs: list, n_workers: int):
    """``fn`` over ``jobs`` in ``n_workers`` threads, results as they finish. Threads, not processes:
    Pillow and numpy release the GIL while they decode, resize and copy, and a forked process of a
    program that already runs threads (torch's, a progress bar's, a training's prefetch) can hang
    on a lock one of them held."""
    if n_workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    with ThreadPoolExecutor(n_workers, thread_name_prefix="supcon-decode") as pool:
        futures = [pool.submit(fn, job) for job in jobs]
        try:
            for f in as_completed(futures):
                yield f.result()
        finally:
            for f in futures:
                f.cancel()


def _allocate(n: int, h: int, w: int) -> np.ndarray:
    """The uint8 [n, h, w, 3] array for the decoded images, refused up front if it cannot fit."""
    need = n * h * w * 3
    avail = _available_memory()
    too_much = f"{n} images at {w}x{h} need {_bytes(need)} of memory"
    if avail is not None and need > avail:
        raise UsageError(f"{too_much}, but {_bytes(avail)} is available; use a smaller --image-size")
    try:
        return np.empty((n, h, w, 3), dtype=np.uint8)
    except (MemoryError, ValueError) as e:  # ValueError: more than numpy can index
        raise UsageError(
            f"{too_much}, which cannot be allocated ({_reason(e)}); use a smaller --image-size"
        ) from None


def _available_memory() -> int | None:
    """Bytes of memory available without swapping (Linux's MemAvailable), else free RAM, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def _worker_count(workers: int | None, n_files: int) -> int:
    if workers is not None:
        return max(1, int(workers))
    if n_files < _POOL_MIN_FILES:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 8))


def _decode_job(job: tuple[list[str], np.ndarray, int | None, str]) -> tuple[int, str | None]:
    paths, out, image_size, first = job
    try:
        _decode_into(paths, out, image_size, first)
    except UsageError as e:
        return len(paths), str(e)
    return len(paths), None


def _image_size(file: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(file) as im:
            return im.size
    except Exception as e:
        raise UsageError(f"cannot decode image {file}: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _decode_into(paths: list[str], out: np.ndarray, image_size: int | None, first: str) -> None:
    from PIL import Image

    h, w = out.shape[1:3]
    for i, file in enumerate(paths):
        try:
            with Image.open(file) as im:
                if image_size is None and im.size != (w, h):
                    raise UsageError(
                        f"image {file} is {im.size[0]}x{im.size[1]} but {first} is {w}x{h}; "
                        "pass --image-size N to resize every image to NxN"
                    )
                if im.format == "JPEG" and im.size != (w, h):
                    # Lets libjpeg scale large images down by 1/2, 1/4 or 1/8 while decoding (never
                    # below the target size): far fewer pixels to decode and resize.
                    im.draft("RGB", (w, h))
                rgb = _to_rgb(im)
                if rgb.size != (w, h):
                    rgb = rgb.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
                out[i] = np.asarray(rgb)
        except UsageError:
            raise
        except Exception as e:
            # Pillow raises many kinds (OSError, SyntaxError, ValueError, DecompressionBombError...).
            raise UsageError(f"cannot decode image {file}: {_reason(e)}") from None


def _to_rgb(im: Any) -> Any:
    from PIL import Image

    if im.mode == "RGB":
        im.load()
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # 16-bit and float greyscale: Pillow's own conversion to 8 bits clips at 255 instead of
        # scaling, which would turn most 16-bit images white.
        a = np.asarray(im).astype(np.float64)
        if a.size and a.max() > 255:
            a = a * (255.0 / 65535.0)
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    if im.mode == "P" and "transparency" in im.info:
        # Straight to RGB, Pillow warns about palette transparency on every such image; through
        # RGBA it does not, and the colours are the same (alpha is dropped either way).
        im = im.convert("RGBA")
    return im.convert("RGB")
