"""The on-disk image store under faults: a full disk, a cache folder that cannot be used, two builds
at once, a kill mid-build, damaged stores, failed and stale builds."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _files import write_photos  # tests/ is on sys.path under pytest
from supcon.core.errors import UsageError
from supcon.data import diskio
from supcon.data import store as store_mod
from supcon.data.imagefolder import decode_files
from supcon.data.manifest import read_manifest
from supcon.data.store import open_store, store_dir

CLASSES = ("ant", "bee", "cow")


def _photos(root: Path, per_class: int = 4) -> Path:
    return write_photos(root, per_class, seed=1, sizes=(20, 60))


def _open(m, cache, **kw):
    return open_store(m, 24, cache_dir=cache, progress=False, workers=1, **kw)


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "store").iterdir() if p.name.endswith((".partial", ".lock")))


def _pixels(st) -> list[np.ndarray]:
    return [np.array(st.image(i)) for i in range(len(st))]


# --------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_at_allocation_is_one_line_and_removes_the_build(tmp_path, monkeypatch, code):
    m = read_manifest(_photos(tmp_path / "p"))
    kept = open_store(m, 20, cache_dir=tmp_path / "c", progress=False, workers=1)

    def full(fd, offset, length):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(UsageError) as e:
        _open(m, tmp_path / "c")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("no space left on the disk for the image store")
    assert "images.u8" in msg and "SUPCON_DATA" in msg
    assert _leftovers(tmp_path / "c") == []
    assert (kept.path / "index.npy").is_file()  # another size's store is untouched


def test_the_data_file_has_real_blocks_before_it_is_mapped(tmp_path, monkeypatch):
    m = read_manifest(_photos(tmp_path / "p"))
    sizes = []
    real = store_mod._store_job

    def check(job):
        st = os.stat(job[1])
        sizes.append((st.st_size, st.st_blocks * 512))
        return real(job)

    monkeypatch.setattr(store_mod, "_store_job", check)
    _open(m, tmp_path / "c")
    assert sizes and all(alloc >= size for size, alloc in sizes)


def test_a_sparse_file_left_by_a_killed_build_does_not_count_as_space_held(tmp_path, monkeypatch):
    import shutil as sh

    m = read_manifest(_photos(tmp_path / "p"))
    total = (_open(m, tmp_path / "clean").path / "images.u8").stat().st_size
    partial = store_dir(m, 24, tmp_path / "c").with_suffix(".partial")
    partial = partial.with_name(store_dir(m, 24, tmp_path / "c").name + ".partial")
    partial.mkdir(parents=True)
    with open(partial / "images.u8", "wb") as f:
        f.truncate(total)  # full length, no blocks
    monkeypatch.setattr(sh, "disk_usage", lambda p: type("U", (), {"free": total // 2})())
    with pytest.raises(UsageError, match=r"image store needs .* free"):
        _open(m, tmp_path / "c")


# --------------------------------------------------------------------------- the cache folder


def test_a_cache_folder_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    m = read_manifest(_photos(tmp_path / "p"))
    (tmp_path / "f").write_text("x")
    for env in (tmp_path / "f", tmp_path / "f" / "sub"):
        monkeypatch.setenv("SUPCON_DATA", str(env))
        with pytest.raises(UsageError, match=rf"{tmp_path / 'f'} is a file, not a folder; set SUPCON_DATA"):
            open_store(m, 24, progress=False, workers=1)
    assert (tmp_path / "f").read_text() == "x"


def test_an_unwritable_cache_folder_is_one_line(tmp_path, monkeypatch):
    m = read_manifest(_photos(tmp_path / "p"))
    real = os.open

    def read_only(path, flags, *a, **kw):  # as a read-only file system answers
        if flags & os.O_CREAT and str(tmp_path / "ro") in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(UsageError, match=r"cannot write the image store folder .*Read-only file system"):
        _open(m, tmp_path / "ro")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_cache_folder_without_write_permission_is_one_line(tmp_path):
    m = read_manifest(_photos(tmp_path / "p"))
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(UsageError, match="Permission denied"):
        _open(m, tmp_path / "ro")


def test_a_missing_home_folder_is_never_created(tmp_path, monkeypatch, capsys):
    m = read_manifest(_photos(tmp_path / "p"))
    monkeypatch.delenv("SUPCON_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    with pytest.raises(UsageError, match=r"home folder .*nohome does not exist.*set SUPCON_DATA"):
        open_store(m, 24, progress=False, workers=1)
    # The in-memory path decodes without its cache, and says so.
    x_train, *_ = decode_files(
        m.root, m.classes, m.train, m.train_y, m.test, m.test_y, image_size=8, progress=False, workers=1
    )
    assert len(x_train) == len(m.train)
    assert "not caching decoded images" in capsys.readouterr().err
    assert not (tmp_path / "nohome").exists()


def test_downloads_refuse_a_missing_home_folder(tmp_path, monkeypatch):
    from supcon.data.download import load_cifar

    monkeypatch.delenv("SUPCON_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    with pytest.raises(UsageError, match="home folder"):
        load_cifar("cifar10", url="file:///nonexistent.tar.gz", progress=False)
    assert not (tmp_path / "nohome").exists()


# --------------------------------------------------------------------------- concurrent builds

_BUILDER = textwrap.dedent(
    """
    import sys, time
    from supcon.data import store as s
    from supcon.data.manifest import read_manifest
    real_job, real_build = s._store_job, s._build
    s._CHUNK = 2
    s._store_job = lambda job: (time.sleep(float(sys.argv[3])), real_job(job))[1]
    s._build = lambda *a, **k: (print("BUILD", flush=True), real_build(*a, **k))[1]
    st = s.open_store(read_manifest(sys.argv[1]), 24, cache_dir=sys.argv[2], progress=False, workers=1)
    print("STORE", st.path, len(st), flush=True)
    """
)


def _builder(data: Path, cache: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _BUILDER, str(data), str(cache), str(delay)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_two_builds_at_once_build_once_and_both_read_the_result(tmp_path):
    data = _photos(tmp_path / "p")
    first = _builder(data, tmp_path / "c", 0.5)
    said = first.stdout.readline()  # it holds the lock from here on, for 6 chunks of 0.5 s
    procs = [first, _builder(data, tmp_path / "c", 0.5)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    text = said + "".join(o for o, _ in outs)
    assert text.count("BUILD") == 1
    assert len({line for line in text.splitlines() if line.startswith("STORE")}) == 1
    assert "waiting for another process" in "".join(e for _, e in outs)
    assert _leftovers(tmp_path / "c") == []
    clean = _open(read_manifest(data), tmp_path / "clean")
    again = _open(read_manifest(data), tmp_path / "c")
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(again), _pixels(clean), strict=True))


def test_a_build_killed_while_another_waits_is_resumed_by_the_waiter(tmp_path):
    data = _photos(tmp_path / "p")
    m = read_manifest(data)
    partial = store_dir(m, 24, tmp_path / "c")
    partial = partial.with_name(partial.name + ".partial")
    first = _builder(data, tmp_path / "c", 1.0)
    deadline = time.time() + 60
    while not (partial / "done.npy").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = _builder(data, tmp_path / "c", 0.0)
    time.sleep(1.0)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "STORE" in out and _leftovers(tmp_path / "c") == []
    clean = _open(m, tmp_path / "clean")
    again = _open(m, tmp_path / "c")
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(again), _pixels(clean), strict=True))


def test_the_lock_is_released_and_its_file_removed(tmp_path):
    lock = tmp_path / "x.lock"
    with diskio.exclusive(lock):
        assert lock.exists()
        with diskio.try_exclusive(lock) as got:
            assert not got  # another open file description: flock conflicts even in one process
    assert not lock.exists()
    with diskio.try_exclusive(lock) as got:
        assert got
    assert not lock.exists()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_file_system_without_locks_builds_unguarded_with_a_warning(tmp_path, monkeypatch, capsys, code):
    import fcntl

    def no_locks(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    st = _open(read_manifest(_photos(tmp_path / "p")), tmp_path / "c")
    assert len(st) == 12 and "cannot lock" in capsys.readouterr().err
    with diskio.try_exclusive(tmp_path / "x.lock") as got:
        assert not got  # what such a lock guards is left alone


# --------------------------------------------------------------------------- damaged stores


def _damage_index(folder: Path, change) -> None:
    index = np.load(folder / "index.npy")
    np.save(folder / "index.npy", change(index))


DAMAGE = {
    "truncated-data": lambda f: os.truncate(f / "images.u8", (f / "images.u8").stat().st_size // 2),
    "empty-data": lambda f: os.truncate(f / "images.u8", 0),
    "longer-data": lambda f: os.truncate(f / "images.u8", (f / "images.u8").stat().st_size + 10),
    "data-is-a-folder": lambda f: ((f / "images.u8").unlink(), (f / "images.u8").mkdir()),
    "index-2-columns": lambda f: _damage_index(f, lambda i: i[:, :2]),
    "index-1-row-short": lambda f: _damage_index(f, lambda i: i[:-1]),
    "index-float": lambda f: _damage_index(f, lambda i: i.astype(np.float32)),
    "offsets-past-end": lambda f: _damage_index(f, lambda i: i + np.array([10**9, 0, 0])),
    "negative-sizes": lambda f: _damage_index(f, lambda i: i * np.array([1, -1, 1])),
    "huge-sizes": lambda f: _damage_index(f, lambda i: i * np.array([1, 1, 10**12])),
    "index-garbage": lambda f: (f / "index.npy").write_bytes(b"\x93NUMPY garbage"),
    "index-a-pickle": lambda f: np.save(f / "index.npy", np.array([{}], dtype=object), allow_pickle=True),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_store_is_found_when_opened_and_rebuilt(tmp_path, capsys, damage):
    m = read_manifest(_photos(tmp_path / "p"))
    clean = _pixels(_open(m, tmp_path / "clean"))
    built = _open(m, tmp_path / "c")
    del built
    DAMAGE[damage](store_dir(m, 24, tmp_path / "c"))
    again = _open(m, tmp_path / "c")
    err = capsys.readouterr().err
    assert "is damaged" in err and "rebuilding it" in err and len(err.strip().splitlines()) == 1
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(again), clean, strict=True))
    assert _leftovers(tmp_path / "c") == []


def test_a_store_without_its_index_is_built_again_silently(tmp_path, capsys):
    m = read_manifest(_photos(tmp_path / "p"))
    folder = _open(m, tmp_path / "c").path
    (folder / "index.npy").unlink()
    assert len(_open(m, tmp_path / "c")) == 12
    assert "damaged" not in capsys.readouterr().err


# --------------------------------------------------------------------------- failed and stale builds


@pytest.mark.parametrize("fault", ["corrupt", "too-small", "fifo"])
def test_a_failed_build_leaves_no_partial_folder(tmp_path, fault):
    root = _photos(tmp_path / "p")
    bad = root / "bee" / "2.png"
    if fault == "corrupt":
        bad.write_bytes(b"not a png")
    elif fault == "too-small":
        Image.fromarray(np.zeros((4, 40, 3), np.uint8)).save(bad)
    m = read_manifest(root)
    if fault == "fifo":
        bad.unlink()
        os.mkfifo(bad)
    with pytest.raises(UsageError, match="bee/2.png"):
        _open(m, tmp_path / "c")
    assert _leftovers(tmp_path / "c") == []


def test_stale_builds_of_earlier_data_are_removed_unless_a_builder_holds_them(tmp_path):
    root = _photos(tmp_path / "p")
    base = store_dir(read_manifest(root), 24, tmp_path / "c")
    prefix = base.name.rsplit("-", 1)[0]
    dead = base.parent / f"{prefix}-{'0' * 24}.partial"
    live = base.parent / f"{prefix}-{'1' * 24}.partial"
    other_size = base.parent / f"{prefix.rsplit('-', 1)[0]}-s99-{'2' * 24}.partial"
    for d in (dead, live, other_size):
        d.mkdir(parents=True)
    with diskio.exclusive(live.with_name(live.name.removesuffix(".partial") + ".lock")):
        _open(read_manifest(root), tmp_path / "c")
        assert not dead.exists() and live.exists() and other_size.exists()
