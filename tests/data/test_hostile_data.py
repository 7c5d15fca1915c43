"""Hostile files on the data layer's surfaces: special files named as images or manifests, one file
listed twice, CSV line numbers, a cache folder that is a file, unwritable or under a missing home,
a full disk, concurrent and failed builds of the image store, and damaged stores."""

from __future__ import annotations

import io
import os
import signal
import tarfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from _files import KINDS, make_special, write_photos  # tests/ is on sys.path under pytest
from supcon.core.errors import UsageError
from supcon.data import store as store_mod
from supcon.data.archives import open_tar
from supcon.data.imagefolder import decode_files
from supcon.data.manifest import read_manifest
from supcon.data.store import open_store

CLASSES = ("ant", "bee", "cow")


def _photos(root: Path, per_class: int = 4) -> Path:
    return write_photos(root, per_class, seed=0, sizes=(20, 60))


def _csv(tmp_path: Path, lines: list[str], header: str = "path,label,split") -> Path:
    _photos(tmp_path / "p")
    f = tmp_path / "m.csv"
    f.write_text("\n".join([header, *lines]) + "\n")
    return f


def _base_rows() -> list[str]:
    return [f"p/{c}/{i}.png,{c},{'test' if i == 0 else 'train'}" for c in CLASSES for i in range(1, 4)] + [
        f"p/{c}/0.png,{c},test" for c in CLASSES
    ]


@contextmanager
def _deadline(seconds: int = 20):
    """Fail instead of hanging: a blocking open of a FIFO would otherwise stall the suite."""

    def fire(*_):
        raise TimeoutError("hung")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# --------------------------------------------------------------------------- special files


@pytest.mark.parametrize("what", KINDS)
def test_a_manifest_row_naming_a_special_file_is_refused_naming_the_row(tmp_path, what):
    csv = _csv(tmp_path, [*_base_rows(), "p/ant/odd.png,ant,train"])
    make_special(tmp_path / "p" / "ant" / "odd.png", what, device="/dev/zero")
    with _deadline(), pytest.raises(UsageError) as e:
        read_manifest(csv)
    msg = _one_line(e)
    assert "p/ant/odd.png (line 14:" in msg and "not regular files" in msg


def test_a_manifest_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "m.csv")
    with _deadline(), pytest.raises(UsageError, match=r"m\.csv is a FIFO, not a regular file"):
        read_manifest(tmp_path / "m.csv")


@pytest.mark.parametrize("stage", ["shapes", "pixels"])
def test_an_image_swapped_for_a_fifo_after_listing_is_refused_by_the_store(tmp_path, monkeypatch, stage):
    m = read_manifest(_photos(tmp_path / "p"))
    victim = Path(m.train[1][0])
    if stage == "pixels":  # the sizes are read, then the file changes before its pixels are
        real = store_mod._source_shapes

        def then_swap(*a, **kw):
            out = real(*a, **kw)
            victim.unlink()
            os.mkfifo(victim)
            return out

        monkeypatch.setattr(store_mod, "_source_shapes", then_swap)
    else:
        victim.unlink()
        os.mkfifo(victim)
    with _deadline(), pytest.raises(UsageError) as e:
        open_store(m, 24, cache_dir=tmp_path / "c", progress=False, workers=1)
    assert f"{victim} is a FIFO, not a regular file" in _one_line(e)
    assert not list((tmp_path / "c" / "store").glob("*.partial"))


def test_the_in_memory_decode_refuses_a_fifo_too(tmp_path):
    m = read_manifest(_photos(tmp_path / "p"))
    victim = Path(m.test[0][0])
    victim.unlink()
    os.mkfifo(victim)
    with _deadline(), pytest.raises(UsageError, match="is a FIFO, not a regular file"):
        decode_files(
            m.root, m.classes, m.train, m.train_y, m.test, m.test_y,
            image_size=16, cache_dir=tmp_path / "c", progress=False, workers=1,
        )  # fmt: skip


# --------------------------------------------------------------------------- one file listed twice


@pytest.mark.parametrize(
    "alias",
    [
        lambda d: "p/ant/1.png",  # the same path
        lambda d: "./p/ant/1.png",  # spelled differently
        lambda d: (d / "link.png").symlink_to(d / "p" / "ant" / "1.png") or "link.png",
        lambda d: os.link(d / "p" / "ant" / "1.png", d / "hard.png") or "hard.png",
    ],
    ids=["same-path", "dot-path", "symlink", "hardlink"],
)
def test_one_file_in_train_and_test_is_refused_naming_both_rows(tmp_path, alias):
    csv = _csv(tmp_path, _base_rows())
    rows = _base_rows() + [f"{alias(tmp_path)},ant,test"]
    csv.write_text("\n".join(["path,label,split", *rows]) + "\n")
    with pytest.raises(UsageError) as e:
        read_manifest(csv)
    msg = _one_line(e)
    assert "p/ant/1.png (line 2) (train)" in msg and "(line 14) (test) are the same file" in msg


@pytest.mark.parametrize("split", ["train", "", "test"])
def test_one_file_under_two_labels_is_refused(tmp_path, split):
    rows = _base_rows() + [f"p/ant/1.png,bee,{split}"]
    with pytest.raises(UsageError) as e:
        read_manifest(_csv(tmp_path, rows))
    msg = _one_line(e)
    assert "same file" in msg and "line 14" in msg and "line 2" in msg


def test_a_multilabel_manifest_listing_a_file_in_both_splits_is_refused(tmp_path):
    rows = [f"p/{c}/{i}.png,{c};x,{'test' if i == 0 else 'train'}" for c in CLASSES for i in range(4)]
    rows.append("p/bee/2.png,bee;x,test")
    with pytest.raises(UsageError, match=r"p/bee/2\.png \(line 8\) \(train\) and .*\(line 14\) \(test\)"):
        read_manifest(_csv(tmp_path, rows, "path,labels,split"))


def test_a_hard_link_across_the_split_folders_is_refused(tmp_path):
    root = tmp_path / "s"
    for split in ("train", "test"):
        _photos(root / split)
    (root / "test" / "bee" / "0.png").unlink()
    os.link(root / "train" / "bee" / "2.png", root / "test" / "bee" / "0.png")
    with pytest.raises(UsageError, match=r"train/bee/2\.png \(train\) and test/bee/0\.png \(test\)"):
        read_manifest(root)


def test_a_file_listed_twice_in_one_split_under_one_label_is_accepted(tmp_path):
    m = read_manifest(_csv(tmp_path, [*_base_rows(), "p/ant/1.png,ant,train"]))
    assert len(m.train) == 10


# --------------------------------------------------------------------------- line numbers


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("path,label,split\np/ant/1.png,ant,\np/bee/1.png,bee,test\n\np/cow/1.png,,\n", 5),
        ("path,label,split\n\n\n\np/ant/1.png,ant,\np/bee/1.png,bee,test\np/cow/1.png,,\n", 7),
        ('path,label,split,note\np/ant/1.png,ant,train,"a\nb"\np/bee/1.png,bee,test,\n\np/cow/1.png,,,\n', 6),
        ("path,label,split\r\n\r\n\r\np/ant/1.png,ant,\r\np/bee/1.png,bee,test\r\n\r\np/cow/1.png,,\r\n", 7),
    ],
    ids=["plain", "blank-lines", "quoted-line-break", "crlf"],
)
def test_csv_errors_name_the_files_own_line(tmp_path, text, line):
    _photos(tmp_path / "p")
    (tmp_path / "m.csv").write_bytes(text.encode())
    with pytest.raises(UsageError, match=rf"m\.csv, line {line}: empty label"):
        read_manifest(tmp_path / "m.csv")


def test_a_missing_file_after_many_blank_lines_names_its_line(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\n" + "\n" * 100_000 + "a.png,x\nb.png,y\n")
    with pytest.raises(UsageError, match=r"a\.png \(line 100002\), b\.png \(line 100003\)"):
        read_manifest(tmp_path / "m.csv")


# --------------------------------------------------------------------------- archives


@pytest.mark.parametrize("content", [os.urandom(3000), b"\x1f\x8b" + os.urandom(500), b""])
def test_a_corrupt_archive_is_one_line(tmp_path, content):
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(content)
    with pytest.raises(UsageError) as e, open_tar(bad) as tf:
        list(tf)
    assert "corrupt or truncated" in _one_line(e)


def test_a_truncated_archive_is_one_line(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = os.urandom(100_000)
        info = tarfile.TarInfo("a.bin")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (tmp_path / "t.tar.gz").write_bytes(buf.getvalue()[:5000])
    with pytest.raises(UsageError) as e, open_tar(tmp_path / "t.tar.gz") as tf:
        for m in tf:
            tf.extractfile(m).read()
    _one_line(e)


@pytest.mark.parametrize(
    "name", ['"p/a\nb.png"', '"p/a\rb.png"', '"p/a\x1bb.png"', "p/" + "x" * 5000 + ".jpg"]
)
def test_a_path_with_control_characters_or_of_any_length_is_named_on_one_bounded_line(tmp_path, name):
    with pytest.raises(UsageError) as e:
        read_manifest(_csv(tmp_path, [*_base_rows(), f"{name},ant,train"]))
    msg = _one_line(e)
    assert "(line 14)" in msg and "\r" not in msg and "\x1b" not in msg and len(msg) < 800


def test_a_fifo_in_place_of_the_decode_cache_is_not_read(tmp_path):
    from supcon.data.imagefolder import _cache_file

    m = read_manifest(_photos(tmp_path / "p"))
    args = (m.root, m.classes, m.train, m.train_y, m.test, m.test_y)
    cache = _cache_file(m.root, tmp_path / "c", 16, m.train + m.test, np.concatenate([m.train_y, m.test_y]))
    cache.parent.mkdir(parents=True)
    os.mkfifo(cache)
    with _deadline():
        x_train, *_ = decode_files(*args, image_size=16, cache_dir=tmp_path / "c", progress=False, workers=1)
    assert len(x_train) == len(m.train)
