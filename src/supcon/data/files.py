"""Image files on disk, as the image folder, the CSV manifest, the on-disk store and inference read
them: class folders listed in a fixed order, images found under them, threads to decode in, an
image converted to RGB, and the short error texts they share.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from supcon.core.errors import UsageError
from supcon.data.diskio import open_regular

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# Below this many images a pool of decoding threads costs more than it saves.
POOL_MIN_FILES = 4096


ImageFile = tuple[str, str, int, int]  # absolute path, path relative to the data folder, size, mtime_ns


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


def flatten(per_class: list[list[ImageFile]]) -> list[ImageFile]:
    return [f for files in per_class for f in files]


def class_labels(per_class: list[list[ImageFile]]) -> np.ndarray:
    return np.repeat(np.arange(len(per_class), dtype=np.int64), [len(c) for c in per_class])


def visible(name: str) -> bool:
    return not name.startswith(".")


def subfolders(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if visible(e.name) and e.is_dir())
    except OSError as e:  # unreadable, a name too long, a link loop
        raise UsageError(f"cannot read folder {folder}: {e.strerror or e}") from None


def class_folders(root: Path) -> list[str]:
    layout = f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image>"
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UsageError(f"data folder {root} has no {split}/ subfolder; {layout}")
    classes = subfolders(root / "train")
    if not classes:
        raise UsageError(f"{root / 'train'} has no class folders; {layout}")
    if len(classes) < 2:
        raise UsageError(
            f"{root / 'train'} has only one class folder ({classes[0]}); a classifier needs 2 or more"
        )
    test_classes = subfolders(root / "test")
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


def list_class(root: Path, split: str, cls: str) -> list[ImageFile]:
    """The class's images (sub-folders included), sorted, with the size and mtime the cache key uses."""
    out: list[ImageFile] = []
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
            if not visible(e.name):
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


def human_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def worker_count(workers: int | None, n_files: int) -> int:
    if workers is not None:
        return max(1, int(workers))
    if n_files < POOL_MIN_FILES:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 8))


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


@contextlib.contextmanager
def open_image(path: str | os.PathLike[str]) -> Iterator[Any]:
    """A Pillow image of ``path``, which must be a regular file: a FIFO or a device in its place is
    one line (:class:`UsageError`), not a read that blocks forever."""
    from PIL import Image

    with open_regular(path, "image") as f, Image.open(f) as im:
        yield im


def to_rgb(im: Any) -> Any:
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
