"""Image files decoded to uint8 arrays held in memory.

:func:`decode_files` takes the files a manifest lists (:mod:`supcon.data.manifest`: an image folder
or a CSV file) and returns ``(x_train, y_train, x_test, y_test, classes)``: uint8 images
[N, H, W, 3] (RGB, NHWC), int64 labels [N] and the class names.

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
import zipfile
from pathlib import Path

import numpy as np

from supcon.core.errors import UsageError
from supcon.core.files import atomic_write
from supcon.data.dataset import Arrays
from supcon.data.diskio import cache_root, open_regular, warn
from supcon.data.files import (
    ImageFile,
    first_line,
    human_bytes,
    open_image,
    run_threads,
    to_rgb,
    worker_count,
)

# Bump when the decoded pixels would differ for the same files (resize method, mode handling, ...),
# so that caches written by an older version are not reused.
FORMAT_VERSION = 1

_CHUNK = 512


def decode_files(
    root: Path,
    classes: list[str],
    train: list[ImageFile],
    y_train: np.ndarray,
    test: list[ImageFile],
    y_test: np.ndarray,
    *,
    image_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> Arrays:
    """Decode listed files (a :class:`supcon.data.manifest.Manifest`'s) into uint8 arrays, from the
    decode cache when nothing changed since the last read: ``(x_train, y_train, x_test, y_test,
    classes)``.

    Every image must have the same size unless ``image_size`` is given, in which case each is resized
    (bilinear, after a cheap power-of-two reduction for large images) to ``image_size`` x ``image_size``.
    ``workers``: decoding threads; None picks one a CPU (at most 8), 0 or 1 decodes in this thread.
    """
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise UsageError(f"image size must be a positive whole number of pixels, got {image_size!r}")
    cache_file = _cache_file(root, cache_dir, image_size, train + test, np.concatenate([y_train, y_test]))
    cached = _read_cache(cache_file, classes) if cache_file is not None else None
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
    if cache_file is not None:
        _write_cache(cache_file, root, out)
    return out


# --------------------------------------------------------------------------- listing


# --------------------------------------------------------------------------- cache


def _cache_file(
    root: Path,
    cache_dir: str | os.PathLike[str] | None,
    image_size: int | None,
    files: list[ImageFile],
    labels,
) -> Path | None:
    """The cache file of these files, or None when there is no cache folder to use (said in one line:
    the cache only saves the next run time)."""
    try:
        base = cache_root(cache_dir)
    except UsageError as e:
        warn(f"not caching decoded images: {e}")
        return None
    lines = [f"supcon imagefolder v{FORMAT_VERSION}", str(root), f"image_size={image_size}"]
    lines += [f"{rel}\t{size}\t{mtime}\t{y}" for (_, rel, size, mtime), y in zip(files, labels, strict=True)]
    key = hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    # The folder's own hash first, so a newer cache of the same folder can replace older ones.
    folder_hash = hashlib.sha256(str(root).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return base / "imagefolder" / f"{folder_hash}-{key}.npz"


def _read_cache(file: Path, classes: list[str]) -> Arrays | None:
    try:
        # Our own handle: np.load leaks the one it opens when the file is not a valid archive. Regular
        # files only (UsageError is a ValueError): a FIFO in the cache would block the read.
        with open_regular(file, "decode cache") as fh, np.load(fh, allow_pickle=False) as z:
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


def _write_cache(file: Path, data_root: Path, split: Arrays) -> None:
    """Best effort: a cache that can't be written costs the next run time, not this run its data."""
    folder = file.parent
    with contextlib.suppress(OSError):
        if folder.resolve().is_relative_to(data_root):
            warn(f"not caching decoded images: cache folder {folder} is inside the data folder {data_root}")
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
        warn(f"could not cache decoded images: {e}")
        return
    # Caches of earlier states of the same folder are dead weight (each can be hundreds of MB).
    prefix = file.name.split("-", 1)[0] + "-"
    for old in folder.glob(f"{prefix}*.npz"):
        if old != file:
            with contextlib.suppress(OSError):
                old.unlink()


# --------------------------------------------------------------------------- decoding


def _decode_all(
    files: list[ImageFile], image_size: int | None, *, progress: bool, workers: int | None, desc: str
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
        for n, error in run_threads(_decode_job, jobs, worker_count(workers, len(paths))):
            if error is not None:
                raise UsageError(error)
            bar.update(n)
    return out


def _allocate(n: int, h: int, w: int) -> np.ndarray:
    """The uint8 [n, h, w, 3] array for the decoded images, refused up front if it cannot fit."""
    need = n * h * w * 3
    avail = _available_memory()
    too_much = f"{n} images at {w}x{h} need {human_bytes(need)} of memory"
    if avail is not None and need > avail:
        raise UsageError(f"{too_much}, but {human_bytes(avail)} is available; use a smaller --image-size")
    try:
        return np.empty((n, h, w, 3), dtype=np.uint8)
    except (MemoryError, ValueError) as e:  # ValueError: more than numpy can index
        raise UsageError(
            f"{too_much}, which cannot be allocated ({first_line(e)}); use a smaller --image-size"
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


def _decode_job(job: tuple[list[str], np.ndarray, int | None, str]) -> tuple[int, str | None]:
    paths, out, image_size, first = job
    try:
        _decode_into(paths, out, image_size, first)
    except UsageError as e:
        return len(paths), str(e)
    return len(paths), None


def _image_size(file: str) -> tuple[int, int]:

    try:
        with open_image(file) as im:
            return im.size
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"cannot decode image {file}: {first_line(e)}") from None


def _decode_into(paths: list[str], out: np.ndarray, image_size: int | None, first: str) -> None:
    from PIL import Image

    h, w = out.shape[1:3]
    for i, file in enumerate(paths):
        try:
            with open_image(file) as im:
                if image_size is None and im.size != (w, h):
                    raise UsageError(
                        f"image {file} is {im.size[0]}x{im.size[1]} but {first} is {w}x{h}; "
                        "pass --image-size N to resize every image to NxN"
                    )
                if im.format == "JPEG" and im.size != (w, h):
                    # Lets libjpeg scale large images down by 1/2, 1/4 or 1/8 while decoding (never
                    # below the target size): far fewer pixels to decode and resize.
                    im.draft("RGB", (w, h))
                rgb = to_rgb(im)
                if rgb.size != (w, h):
                    rgb = rgb.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
                out[i] = np.asarray(rgb)
        except UsageError:
            raise
        except Exception as e:
            # Pillow raises many kinds (OSError, SyntaxError, ValueError, DecompressionBombError...).
            raise UsageError(f"cannot decode image {file}: {first_line(e)}") from None
