"""Image folders written with Pillow: modes, formats, resizing, the decode cache and every error."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from supcon.core.errors import UsageError
from supcon.data import imagefolder
from supcon.data.imagefolder import decode_files
from supcon.data.manifest import read_manifest


def _solid(mode: str, size: tuple[int, int], value) -> Image.Image:
    if mode == "P":
        im = Image.new("P", size, 1)
        im.putpalette([0, 0, 0, *value] + [0] * (256 * 3 - 6))
        return im
    return Image.new(mode, size, value)


def _save(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def _make(root: Path, size=(8, 6)) -> Path:
    """Two classes, mixed modes and formats; colours chosen so that every image is identifiable."""
    _save(root / "train" / "cat" / "a.png", _solid("RGB", size, (255, 0, 0)))
    _save(root / "train" / "cat" / "b.PNG", _solid("L", size, 100))
    _save(root / "train" / "cat" / "sub" / "c.png", _solid("RGBA", size, (0, 0, 255, 128)))
    _save(root / "train" / "dog" / "d.png", _solid("P", size, (0, 200, 0)))
    _save(root / "train" / "dog" / "e.jpg", _solid("RGB", size, (250, 250, 250)), quality=95)
    _save(root / "test" / "cat" / "f.bmp", _solid("RGB", size, (10, 20, 30)))
    _save(root / "test" / "dog" / "g.JPEG", _solid("L", size, 50), quality=95)
    # Ignored: hidden files and folders, other extensions.
    _save(root / "train" / "cat" / ".hidden.png", _solid("RGB", (3, 3), 0))
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / ".DS_Store").write_bytes(b"\0\0")
    _save(root / "train" / ".cache" / "x.png", _solid("RGB", size, 0))
    _save(root / "test" / ".cache" / "x.png", _solid("RGB", size, 0))
    return root


def load_folder(root, **kw):
    """An image folder decoded as the dataset loader does: listed by its manifest, then decoded."""
    m = read_manifest(root)
    return decode_files(m.root, m.classes, m.train, m.train_y, m.test, m.test_y, **kw)


def _load(root, tmp_path, **kw):
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("progress", False)
    return load_folder(root, **kw)


def test_round_trip_modes_and_formats(tmp_path):
    root = _make(tmp_path / "data")
    x_train, y_train, x_test, y_test, classes = _load(root, tmp_path)
    assert classes == ["cat", "dog"]
    assert x_train.dtype == np.uint8 and x_train.shape == (5, 6, 8, 3)
    assert x_test.shape == (2, 6, 8, 3)
    assert y_train.dtype == np.int64 and y_train.tolist() == [0, 0, 0, 1, 1]
    assert y_test.tolist() == [0, 1]
    # Sorted within a class, sub-folders included: a.png, b.PNG, sub/c.png.
    assert x_train[0, 0, 0].tolist() == [255, 0, 0]
    assert x_train[1, 0, 0].tolist() == [100, 100, 100]
    assert x_train[2, 0, 0].tolist() == [0, 0, 255]  # alpha dropped
    assert x_train[3, 0, 0].tolist() == [0, 200, 0]  # palette expanded
    assert np.abs(x_train[4].astype(int) - 250).max() <= 3  # jpeg
    assert x_test[0, 0, 0].tolist() == [10, 20, 30]
    assert np.abs(x_test[1].astype(int) - 50).max() <= 3


def test_cmyk_and_16_bit(tmp_path):
    root = tmp_path / "data"
    _save(root / "train" / "a" / "cmyk.jpg", Image.new("CMYK", (4, 4), (0, 0, 0, 0)), quality=95)
    _save(root / "train" / "a" / "tif.tif", Image.new("RGB", (4, 4), (1, 2, 3)))
    _save(root / "train" / "b" / "g16.png", Image.fromarray(np.full((4, 4), 65535, np.uint16)))
    _save(root / "test" / "a" / "w.webp", Image.new("RGB", (4, 4), (0, 0, 0)), lossless=True)
    _save(root / "test" / "b" / "g.gif", _solid("P", (4, 4), (9, 9, 9)))
    _save(root / "test" / "b" / "t.png", _solid("P", (4, 4), (9, 9, 9)), transparency=bytes([0, 128]))
    _save(root / "test" / "b" / "u.png", Image.new("LA", (4, 4), (7, 100)))
    _save(root / "test" / "b" / "v.png", Image.new("1", (4, 4), 1))
    x_train, _, x_test, _, _ = _load(root, tmp_path)
    assert np.abs(x_train[0].astype(int) - 255).max() <= 3  # CMYK white
    assert x_train[1, 0, 0].tolist() == [1, 2, 3]
    assert x_train[2, 0, 0].tolist() == [255, 255, 255]  # scaled, not clipped
    assert x_test[0, 0, 0].tolist() == [0, 0, 0]
    assert x_test[1, 0, 0].tolist() == [9, 9, 9]
    assert x_test[2, 0, 0].tolist() == [9, 9, 9]
    assert x_test[3, 0, 0].tolist() == [7, 7, 7]
    assert x_test[4, 0, 0].tolist() == [255, 255, 255]


def test_size_mismatch_names_file_and_suggests_image_size(tmp_path):
    root = _make(tmp_path / "data")
    _save(root / "test" / "dog" / "h.png", _solid("RGB", (9, 9), (1, 1, 1)))
    with pytest.raises(
        UsageError, match=r"test/dog/h\.png is 9x9 but .*train/cat/a\.png is 8x6; pass --image-size N"
    ):
        _load(root, tmp_path)
    x_train, _, x_test, _, _ = _load(root, tmp_path, image_size=4)
    assert x_train.shape == (5, 4, 4, 3) and x_test.shape == (3, 4, 4, 3)
    assert x_train[0, 2, 2].tolist() == [255, 0, 0]
    assert x_test[2, 1, 1].tolist() == [1, 1, 1]


def test_resize_large_jpeg_up_and_down(tmp_path):
    root = tmp_path / "data"
    big = np.zeros((200, 300, 3), np.uint8)
    big[:, :150] = (200, 0, 0)  # left half red, right half black
    _save(root / "train" / "a" / "big.jpg", Image.fromarray(big), quality=95)
    _save(root / "train" / "b" / "small.png", _solid("RGB", (2, 2), (0, 0, 200)))
    _save(root / "test" / "a" / "x.png", _solid("RGB", (16, 16), (0, 0, 0)))
    _save(root / "test" / "b" / "y.png", _solid("RGB", (16, 16), (0, 0, 0)))
    x_train = _load(root, tmp_path, image_size=16)[0]
    assert x_train.shape == (2, 16, 16, 3)
    assert abs(int(x_train[0, 8, 2, 0]) - 200) <= 8 and x_train[0, 8, 13, 0] <= 8
    assert x_train[1, 5, 5].tolist() == [0, 0, 200]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "32"])
def test_bad_image_size(tmp_path, bad):
    with pytest.raises(UsageError, match="image size must be a positive whole number"):
        _load(_make(tmp_path / "data"), tmp_path, image_size=bad)


def test_cache_hit_skips_decoding(tmp_path, monkeypatch):
    root = _make(tmp_path / "data")
    first = _load(root, tmp_path)
    files = list((tmp_path / "cache" / "imagefolder").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"

    def fail(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(imagefolder, "_decode_all", fail)
    second = _load(root, tmp_path)
    for a, b in zip(first[:4], second[:4], strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert second[4] == first[4]
    # Another image size is another cache entry.
    with pytest.raises(AssertionError, match="decoded again"):
        _load(root, tmp_path, image_size=4)


def test_changed_folder_is_read_again_and_old_cache_removed(tmp_path):
    root = _make(tmp_path / "data")
    x_train = _load(root, tmp_path)[0]
    _save(root / "train" / "dog" / "z.png", _solid("RGB", (8, 6), (7, 7, 7)))
    x_train2, y_train2, *_ = _load(root, tmp_path)
    assert len(x_train2) == len(x_train) + 1 and y_train2.tolist() == [0, 0, 0, 1, 1, 1]
    assert x_train2[-1, 0, 0].tolist() == [7, 7, 7]
    assert len(list((tmp_path / "cache" / "imagefolder").iterdir())) == 1

    # Same file list, rewritten content (a new mtime): read again.
    _save(root / "train" / "dog" / "z.png", _solid("RGB", (8, 6), (8, 8, 8)))
    os.utime(root / "train" / "dog" / "z.png", ns=(1, 1))
    assert _load(root, tmp_path)[0][-1, 0, 0].tolist() == [8, 8, 8]


def test_corrupt_cache_is_rebuilt(tmp_path):
    root = _make(tmp_path / "data")
    expected = _load(root, tmp_path)[0]
    (cache_file,) = (tmp_path / "cache" / "imagefolder").iterdir()
    cache_file.write_bytes(b"PK\x03\x04 truncated")
    np.testing.assert_array_equal(_load(root, tmp_path)[0], expected)


def test_default_cache_is_supcon_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPCON_DATA", str(tmp_path / "env"))
    load_folder(_make(tmp_path / "data"), progress=False)
    assert len(list((tmp_path / "env" / "imagefolder").glob("*.npz"))) == 1


def test_read_only_data_folder(tmp_path):
    root = _make(tmp_path / "data")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    paths = [root, *root.rglob("*")]
    for p in paths:
        p.chmod(stat.S_IREAD | (stat.S_IEXEC if p.is_dir() else 0))
    try:
        x_train = _load(root, tmp_path, progress=True)[0]
        assert x_train.shape == (5, 6, 8, 3)
    finally:
        for p in paths:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def _one_warning(capsys, start: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"supcon: warning: {start}") and err.count("\n") == 1, err
    return err


def test_cache_inside_data_folder_is_not_written(tmp_path, capsys, recwarn):
    root = _make(tmp_path / "data")
    before = sorted(root.rglob("*"))
    _load(root, tmp_path, cache_dir=root / "train")
    _one_warning(capsys, "not caching decoded images: cache folder")
    assert not recwarn.list  # a plain line, not a Python warning with file and line number
    assert sorted(root.rglob("*")) == before


def test_unwritable_cache_warns_but_loads(tmp_path, capsys, recwarn):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    x_train = _load(_make(tmp_path / "data"), tmp_path, cache_dir=blocker)[0]
    err = _one_warning(capsys, f"could not cache decoded images: cannot write {blocker}/imagefolder/")
    assert err.endswith(f": {blocker} is not a folder\n")
    assert not recwarn.list
    assert len(x_train) == 5


def test_pool_gives_the_same_arrays(tmp_path, monkeypatch):
    root = _make(tmp_path / "data")
    monkeypatch.setattr(imagefolder, "_CHUNK", 2)  # several jobs, finishing in any order
    decode, where = imagefolder._decode_job, set()

    def recording(job):
        where.add((os.getpid(), threading.current_thread().name.split("_")[0]))
        return decode(job)

    monkeypatch.setattr(imagefolder, "_decode_job", recording)
    pooled = _load(root, tmp_path, workers=2, cache_dir=tmp_path / "c1")
    # Threads of this process, not forked children: a fork of a threaded program can hang.
    assert where == {(os.getpid(), "supcon-decode")}
    inline = _load(root, tmp_path, workers=1, cache_dir=tmp_path / "c2")
    for a, b in zip(pooled[:4], inline[:4], strict=True):
        np.testing.assert_array_equal(a, b)
    _save(root / "test" / "dog" / "zz.png", _solid("RGB", (5, 5), 0))
    with pytest.raises(UsageError, match=r"zz\.png is 5x5"):
        _load(root, tmp_path, workers=2, cache_dir=tmp_path / "c1")


def test_missing_and_not_a_folder(tmp_path):
    with pytest.raises(UsageError, match=r"data folder .*nope does not exist"):
        _load(tmp_path / "nope", tmp_path)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UsageError, match=r"data path .*file\.txt is a file but not a \.csv manifest"):
        _load(f, tmp_path)


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_split(tmp_path, split):
    root = _make(tmp_path / "data")
    os.rename(root / split, root / f"{split}-old")
    with pytest.raises(UsageError, match=rf"data folder .*data has no {split}/ subfolder"):
        _load(root, tmp_path)


def test_no_classes_and_one_class(tmp_path):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    _save(root / "train" / "loose.png", _solid("RGB", (2, 2), 0))
    with pytest.raises(UsageError, match=r"train has no class folders"):
        _load(root, tmp_path)
    _save(root / "train" / "only" / "a.png", _solid("RGB", (2, 2), 0))
    _save(root / "test" / "only" / "a.png", _solid("RGB", (2, 2), 0))
    with pytest.raises(UsageError, match=r"only one class folder \(only\)"):
        _load(root, tmp_path)


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_class_is_named(tmp_path, split):
    root = _make(tmp_path / "data")
    (root / split / "emu").mkdir()
    (root / split / "emu" / "readme.txt").write_text("no images here")
    other = "test" if split == "train" else "train"
    _save(root / other / "emu" / "a.png", _solid("RGB", (8, 6), 0))
    with pytest.raises(UsageError, match=rf"class folder .*{split}/emu has no images"):
        _load(root, tmp_path)


def test_class_sets_differ(tmp_path):
    root = _make(tmp_path / "data")
    _save(root / "train" / "eel" / "a.png", _solid("RGB", (8, 6), 0))
    _save(root / "test" / "fox" / "a.png", _solid("RGB", (8, 6), 0))
    with pytest.raises(UsageError, match=r"differ: only in train: eel; only in test: fox"):
        _load(root, tmp_path)


@pytest.mark.parametrize("where", ["first", "later"])
def test_corrupt_image_is_named(tmp_path, where):
    root = _make(tmp_path / "data")
    name = "a.png" if where == "first" else "d.png"
    cls = "cat" if where == "first" else "dog"
    bad = root / "train" / cls / name
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(UsageError, match=rf"cannot decode image .*train/{cls}/{name}"):
        _load(root, tmp_path)
    bad.write_bytes(b"garbage, not a png")
    with pytest.raises(UsageError, match=rf"cannot decode image .*train/{cls}/{name}"):
        _load(root, tmp_path)
    assert not (tmp_path / "cache" / "imagefolder").exists() or not any(
        (tmp_path / "cache" / "imagefolder").iterdir()
    )


# ---------------------------------------------------------------------------- hostile paths


def _one_line_error(root, tmp_path, match: str, **kw) -> str:
    with pytest.raises(UsageError, match=match) as e:
        _load(root, tmp_path, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_data_path_with_a_name_over_the_limit(tmp_path):
    _one_line_error(tmp_path / ("x" * 300), tmp_path, "^cannot read data path .*: File name too long$")


def test_data_path_that_is_a_link_loop(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    _one_line_error(loop, tmp_path, "^cannot read data path .*loop: Too many levels of symbolic links$")


@pytest.mark.parametrize("kind", ["self", "cycle"])
def test_image_that_is_a_link_loop(tmp_path, kind):
    root = _make(tmp_path / "data")
    a = root / "train" / "cat" / "loop.png"
    if kind == "self":
        a.symlink_to(a)
    else:
        b = root / "train" / "cat" / "other.png"
        a.symlink_to(b)
        b.symlink_to(a)
    _one_line_error(
        root, tmp_path, "^cannot read .*/train/cat/(loop|other).png: Too many levels of symbolic links$"
    )


def _nest(folder: Path, levels: int, colour) -> None:
    """``folder/d/d/.../d/deep.png``, made with relative calls: the whole path may exceed PATH_MAX."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            new = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = new
        with os.fdopen(os.open("deep.png", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
            _solid("RGB", (8, 6), colour).save(f, format="PNG")
    finally:
        os.close(fd)


def _unnest(folder: Path) -> None:
    """Remove ``folder/d/d/...`` one level at a time (shutil.rmtree recurses, and would fail)."""
    top, nxt = folder / "d", folder / "next"
    while top.exists():
        for f in top.iterdir():
            if f.name != "d":
                f.unlink()
        if (top / "d").exists():
            os.rename(top / "d", nxt)
            top.rmdir()
            os.rename(nxt, top)
        else:
            top.rmdir()


@pytest.fixture
def nested(tmp_path):
    folders = []
    yield folders
    for f in folders:
        _unnest(f)


def test_folders_nested_deeper_than_the_recursion_limit_load_in_order(tmp_path, nested):
    import sys

    root = _make(tmp_path / "data")
    nested.append(root / "train" / "dog")
    _nest(root / "train" / "dog", sys.getrecursionlimit() + 100, (1, 2, 3))
    _save(root / "train" / "dog" / "z.png", _solid("RGB", (8, 6), (4, 5, 6)))
    x_train = _load(root, tmp_path)[0]
    # Depth-first in name order: d/.../deep.png, then d.png, e.jpg, then z.png.
    assert x_train[3, 0, 0].tolist() == [1, 2, 3]
    assert x_train[-1, 0, 0].tolist() == [4, 5, 6]


def test_folders_nested_past_the_path_length_limit(tmp_path, nested):
    root = _make(tmp_path / "data")
    nested.append(root / "train" / "dog")
    _nest(root / "train" / "dog", 2100, (1, 2, 3))  # "d/" x 2100: longer than PATH_MAX (4096)
    msg = _one_line_error(root, tmp_path, "^cannot read folder .*/train/dog/d/d/d/.*: File name too long$")
    assert len(msg) < 5000


def test_unreadable_image(tmp_path, monkeypatch):
    import os

    root = _make(tmp_path / "data")
    real_open = os.open

    def deny(path, *a, **kw):  # images are opened with os.open (regular files only); root reads all
        if str(path).endswith("d.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", deny)
    _one_line_error(root, tmp_path, "^cannot read image .*/train/dog/d.png: .*Permission denied", workers=1)


def test_image_size_needing_more_memory_than_there_is_is_refused_before_allocating(tmp_path, monkeypatch):
    root = _make(tmp_path / "data")
    msg = _one_line_error(
        root, tmp_path, r"^7 images at 1000000x1000000 need 19\.1 TiB of memory, but ", image_size=10**6
    )
    assert msg.endswith("is available; use a smaller --image-size")
    monkeypatch.setattr(imagefolder, "_available_memory", lambda: 1000)
    _one_line_error(
        root, tmp_path, r"^7 images at 8x8 need 1\.3 KiB of memory, but 1000 bytes is available", image_size=8
    )
    monkeypatch.setattr(imagefolder, "_available_memory", lambda: None)
    assert _load(root, tmp_path, image_size=8)[0].shape == (5, 8, 8, 3)
