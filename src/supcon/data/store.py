"""An on-disk, memory-mapped store of decoded images: datasets larger than memory, at any aspect ratio.

A manifest's images are decoded once into one flat uint8 file, each image resized so that its
short side is ``short_side`` pixels and its aspect ratio kept, with an index of (offset, height,
width) per image. Training maps the file and reads the images of each batch from it: the pages
are the page cache's, not the process's, so resident anonymous memory stays bounded whatever the
size of the dataset.

Building is parallel (one thread a CPU), resumable and never trusted half-done: it writes into
``<store>.partial/``, records each finished chunk of images there, and only a complete store is
renamed into place. A killed build continues from its finished chunks when the same data is asked
for again; a stop request (Ctrl-C, SIGTERM: :func:`supcon.core.stop.stop_requested`) ends a build
after the chunk in flight with :class:`~supcon.core.stop.Interrupted`, resumable the same way.
Stores are keyed like the decode cache (every file's path, size and mtime, the short side and a
format version), so changed files are read again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from supcon.core.errors import UsageError
from supcon.core.stop import Interrupted, stop_requested
from supcon.data.diskio import (
    DiskFull,
    allocate,
    allocated_bytes,
    cache_root,
    exclusive,
    make_folder,
    one_line,
    open_regular,
    require_regular,
    try_exclusive,
    warn,
)
from supcon.data.files import (
    ImageFile,
    first_line,
    human_bytes,
    open_image,
    run_threads,
    to_rgb,
    worker_count,
)
from supcon.data.manifest import Manifest

FORMAT_VERSION = 1
_CHUNK = 256  # images per decode job: the unit of resumption
_MIN_SIDE = 8  # an image whose short side is below this is too small to crop from
_MAX_SIDE = 1 << 20  # a stored side beyond this is a damaged index, not an image


@dataclass
class Store:
    """A built store, mapped read-only. Image ``i`` is ``images[offset[i]: ...]`` shaped [h, w, 3]."""

    path: Path
    images: np.memmap  # uint8, flat
    offsets: np.ndarray  # int64 [N]
    heights: np.ndarray  # int64 [N]
    widths: np.ndarray  # int64 [N]
    short_side: int

    def __len__(self) -> int:
        return len(self.offsets)

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as a read-only uint8 [h, w, 3] view into the map."""
        o, h, w = int(self.offsets[i]), int(self.heights[i]), int(self.widths[i])
        return self.images[o : o + h * w * 3].reshape(h, w, 3)


def store_dir(manifest: Manifest, short_side: int, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    base = cache_root(cache_dir)
    lines = [f"supcon store v{FORMAT_VERSION}", str(manifest.root), f"short_side={short_side}"]
    lines += [f"{rel}\t{size}\t{mtime}" for _, rel, size, mtime in manifest.files()]
    key = hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    root_hash = hashlib.sha256(str(manifest.root).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    # Data and size first: a newer store of the same data at the same size replaces older ones.
    return base / "store" / f"{root_hash}-s{short_side}-{key}"


def open_store(
    manifest: Manifest,
    short_side: int,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> Store:
    """The store of ``manifest``'s images (train then test, in manifest order), built if needed.

    A complete store is checked against its index before use (cheap: sizes, not pixels); a damaged
    one is rebuilt. One process builds a store at a time, under an OS lock: the others wait, then
    read what it built."""
    final = store_dir(manifest, short_side, cache_dir)
    n = len(manifest.files())
    store, _ = _open(final, n, short_side)
    if store is not None:
        return store  # the common case: built before, and complete stores are never rewritten
    make_folder(final.parent, "the image store folder")
    waiting = f"waiting for another process that is building the image store {final}"
    with exclusive(final.with_name(final.name + ".lock"), waiting):
        store, damage = _open(final, n, short_side)  # built by the process we waited for?
        if store is not None:
            return store
        if damage is not None:
            warn(f"the image store {final} is damaged ({damage}); rebuilding it")
            shutil.rmtree(final, ignore_errors=True)
        _build(manifest, short_side, final, progress=progress, workers=workers)
        store, damage = _open(final, n, short_side)
    if store is None:
        raise UsageError(f"the image store {final} just built is unreadable: {damage}")
    return store


class _Damaged(Exception):
    """A store whose files disagree with its index: what is wrong, in words."""


def _open(folder: Path, n: int, short_side: int) -> tuple[Store | None, str | None]:
    """(the mapped store, None), (None, None) if it is not built, or (None, what is damaged)."""
    if not os.path.lexists(folder / "index.npy"):
        return None, None  # the index is written last: without it nothing here is trusted
    try:
        return _map(folder, n, short_side), None
    except _Damaged as e:
        return None, str(e)


def _map(folder: Path, n: int, short_side: int) -> Store:
    offsets, heights, widths = _read_index(folder / "index.npy", n, short_side)
    data = folder / "images.u8"
    try:
        size = require_regular(data, "image store data file").st_size
    except UsageError as e:
        raise _Damaged(str(e)) from None
    total = int((heights * widths * 3).sum())
    if size != total:
        raise _Damaged(f"{data.name} holds {size:,} bytes but its index describes {total:,}")
    try:
        images = np.memmap(data, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise _Damaged(f"cannot map {data.name}: {one_line(e)}") from None
    return Store(folder, images, offsets, heights, widths, short_side)


def _read_index(file: Path, n: int, short_side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The index's (offsets, heights, widths), checked: n rows, every stored short side
    ``short_side``, sides bounded, images packed one after another from offset 0."""
    try:
        if require_regular(file, "image store index").st_size > 4096 + 24 * n:
            raise _Damaged(f"{file.name} is larger than an index of {n} images")
        with open_regular(file, "image store index") as f:
            index = np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError, UsageError) as e:
        raise _Damaged(f"unreadable {file.name}: {one_line(e)}") from None
    if index.shape != (n, 3) or index.dtype.kind not in "iu":
        raise _Damaged(f"{file.name} is {index.dtype} {list(index.shape)}, not int64 [{n}, 3]")
    index = index.astype(np.int64)
    offsets, heights, widths = index[:, 0], index[:, 1], index[:, 2]
    sides_ok = (np.minimum(heights, widths) == short_side).all() and (
        np.maximum(heights, widths) <= _MAX_SIDE
    ).all()
    if not sides_ok:
        raise _Damaged(f"{file.name} holds image sizes that are not {short_side} px on the short side")
    sizes = heights * widths * 3
    if n and (offsets[0] != 0 or (offsets[1:] != np.cumsum(sizes)[:-1]).any()):
        raise _Damaged(f"{file.name} holds offsets that do not follow the image sizes")
    return offsets, heights, widths


def stored_shape(h: int, w: int, short_side: int) -> tuple[int, int]:
    """The stored (height, width) of an h x w image: short side ``short_side``, aspect ratio kept."""
    scale = short_side / min(h, w)
    return max(short_side, round(h * scale)), max(short_side, round(w * scale))


# --------------------------------------------------------------------------- building


def _build(manifest: Manifest, short_side: int, final: Path, *, progress: bool, workers: int | None) -> None:
    """Build the store into ``<final>.partial`` and rename it into place (the caller holds its lock).

    A build that fails (a corrupt image, a full disk) removes its folder: its key names exactly
    these files, so there is nothing to resume once they are fixed. A killed or interrupted one
    keeps it, and the next build of the same data continues from its finished chunks."""
    partial = final.with_name(final.name + ".partial")
    _remove_stale_builds(final)
    try:
        partial.mkdir(exist_ok=True)
        _fill(manifest, short_side, partial, progress=progress, workers=workers)
        _install(partial, final)
    except (UsageError, OSError) as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError):
            raise UsageError(f"cannot write the image store {partial}: {e.strerror or one_line(e)}") from None
        raise


def _fill(manifest: Manifest, short_side: int, partial: Path, *, progress: bool, workers: int | None) -> None:
    from tqdm import tqdm

    files = manifest.files()
    n_workers = worker_count(workers, len(files) * 16)  # a pool pays off sooner than for tiny images
    shapes = _source_shapes(files, partial, n_workers, progress)
    out = np.array([stored_shape(h, w, short_side) for h, w in shapes], dtype=np.int64).reshape(-1, 2)
    sizes = out[:, 0] * out[:, 1] * 3
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    total = int(sizes.sum())
    data_file = partial / "images.u8"
    _reserve(data_file, total)
    done_file = partial / "done.npy"
    n_chunks = (len(files) + _CHUNK - 1) // _CHUNK
    done = _load_done(done_file, n_chunks)
    jobs = [
        (c, str(data_file), [f[0] for f in files[c * _CHUNK : (c + 1) * _CHUNK]],
         offsets[c * _CHUNK : (c + 1) * _CHUNK], out[c * _CHUNK : (c + 1) * _CHUNK])
        for c in range(n_chunks) if not done[c]
    ]  # fmt: skip
    desc = f"storing {manifest.root.name} (short side {short_side})"
    initial = len(files) - sum(len(j[2]) for j in jobs)
    # closing(): on an error the pool's threads stop before the caller removes their files.
    results = contextlib.closing(run_threads(_store_job, jobs, n_workers))
    bar = tqdm(total=len(files), initial=initial, unit="img", desc=desc, disable=not progress)
    with bar, results as it:
        for chunk, n, error in it:
            if error is not None:
                raise UsageError(error)
            done[chunk] = True
            _save_done(done_file, done)
            bar.update(n)
            _stop_if_requested(partial)
    index = np.stack([offsets, out[:, 0], out[:, 1]], 1)
    np.save(partial / "index.npy.tmp.npy", index)
    meta = {"format": FORMAT_VERSION, "short_side": short_side, "images": len(files), "bytes": total}
    (partial / "meta.json").write_text(json.dumps(meta))
    done_file.unlink()
    # The index appears last, under its final name: its presence is what marks a store complete.
    os.replace(partial / "index.npy.tmp.npy", partial / "index.npy")


def _remove_stale_builds(final: Path) -> None:
    """Remove the half-built stores of earlier states of the same data at the same size: a changed
    file changes the key, so they can never be resumed. Each only under its own lock, which a
    running build holds and a killed one no longer does."""
    prefix = final.name.rsplit("-", 1)[0] + "-"
    for old in final.parent.glob(f"{prefix}*.partial"):
        if old.name == final.name + ".partial":
            continue  # ours: resumed
        with try_exclusive(old.with_name(old.name.removesuffix(".partial") + ".lock")) as got:
            if got:
                shutil.rmtree(old, ignore_errors=True)


def _install(partial: Path, final: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(final)  # an earlier incomplete or damaged copy under the final name
    os.replace(partial, final)
    # Stores of earlier states of the same data at the same size are dead weight (each can be many
    # GiB); other sizes are kept for the runs that train at them. Builds in progress and lock files
    # are left to their owners.
    prefix = final.name.rsplit("-", 1)[0] + "-"
    for old in final.parent.glob(f"{prefix}*"):
        if old != final and old.is_dir() and not old.name.endswith(".partial"):
            shutil.rmtree(old, ignore_errors=True)


def _reserve(data_file: Path, total: int) -> None:
    """The store's file at its full size with its disk blocks allocated, after checking that the
    disk can hold it. Blocks a killed build already allocated count as ours; a sparse file's
    holes do not."""
    need = total - min(allocated_bytes(data_file), total)
    free = shutil.disk_usage(data_file.parent).free
    advice = "free some space, set SUPCON_DATA to a larger disk, or use a smaller --image-size"
    if need > free:
        raise UsageError(
            f"the image store needs {human_bytes(total)} but {data_file.parent.parent} has "
            f"{human_bytes(free)} free; {advice}"
        )
    try:
        allocate(data_file, total, "the image store")
    except DiskFull as e:
        raise DiskFull(f"{e}; {advice}") from None


def _load_done(done_file: Path, n_chunks: int) -> np.ndarray:
    try:
        done = np.load(done_file, allow_pickle=False)
        if done.shape == (n_chunks,) and done.dtype == bool:
            return done
    except (OSError, ValueError):
        pass
    return np.zeros(n_chunks, dtype=bool)


def _save_done(done_file: Path, done: np.ndarray) -> None:
    tmp = done_file.with_name("done.tmp.npy")
    np.save(tmp, done)
    os.replace(tmp, done_file)


def _source_shapes(files: list[ImageFile], partial: Path, n_workers: int, progress: bool) -> np.ndarray:
    """(height, width) of every source image, read from the file headers (kept for a resumed build)."""
    from tqdm import tqdm

    cached = partial / "shapes.npy"
    with contextlib.suppress(OSError, ValueError):
        shapes = np.load(cached, allow_pickle=False)
        if shapes.shape == (len(files), 2):
            return shapes
    shapes = np.zeros((len(files), 2), dtype=np.int64)
    jobs = [(s, [f[0] for f in files[s : s + 4 * _CHUNK]]) for s in range(0, len(files), 4 * _CHUNK)]
    results = contextlib.closing(run_threads(_shape_job, jobs, n_workers))
    bar = tqdm(total=len(files), unit="img", desc="reading image sizes", disable=not progress)
    with bar, results as it:
        for start, part, error in it:
            if error is not None:
                raise UsageError(error)
            shapes[start : start + len(part)] = part
            bar.update(len(part))
            _stop_if_requested(partial)
    np.save(cached, shapes)
    return shapes


def _stop_if_requested(partial: Path) -> None:
    """End the build at a chunk boundary when SIGINT/SIGTERM asked the command to stop: every chunk
    recorded in ``partial`` is kept, and the next build of the same data continues from there."""
    if stop_requested():
        raise Interrupted(partial)


def _shape_job(job):
    start, paths = job
    out = np.zeros((len(paths), 2), dtype=np.int64)
    for i, file in enumerate(paths):
        try:
            with open_image(file) as im:
                w, h = im.size
        except UsageError as e:
            return start, out, str(e)
        except Exception as e:
            return start, out, f"cannot decode image {file}: {first_line(e)}"
        if min(w, h) < _MIN_SIDE:
            return (
                start,
                out,
                f"image {file} is {w}x{h}: too small to crop from (short side under {_MIN_SIDE})",
            )
        out[i] = (h, w)
    return start, out, None


def _store_job(job):
    chunk, data_file, paths, offsets, shapes = job
    try:
        mm = np.memmap(data_file, dtype=np.uint8, mode="r+")
        for file, o, (h, w) in zip(paths, offsets, shapes, strict=True):
            mm[o : o + h * w * 3] = _decode(file, int(h), int(w)).reshape(-1)
        mm.flush()
        del mm
    except UsageError as e:
        return chunk, len(paths), str(e)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            return chunk, len(paths), f"no space left on the disk of the image store {data_file}"
        return chunk, len(paths), f"cannot write the image store {data_file}: {e.strerror or e}"
    return chunk, len(paths), None


def _decode(file: str, h: int, w: int) -> np.ndarray:
    from PIL import Image

    try:
        with open_image(file) as im:
            if im.format == "JPEG":
                im.draft("RGB", (w, h))  # libjpeg's own 1/2, 1/4, 1/8 scaling: far less to decode
            rgb = to_rgb(im)
            if rgb.size != (w, h):
                rgb = rgb.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
            return np.asarray(rgb)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"cannot decode image {file}: {first_line(e)}") from None


__all__ = ["Store", "open_store", "store_dir", "stored_shape"]
