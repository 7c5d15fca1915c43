"""CIFAR loading against tiny archives in the official format, served over http and file:// URLs."""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import socket
import struct
import tarfile
import threading
from functools import partial

import numpy as np
import pytest

from supcon.core.errors import UsageError
from supcon.data.download import load_cifar

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _rows(x: np.ndarray) -> np.ndarray:
    # The official layout: one row per image, 1024 red then 1024 green then 1024 blue values.
    return x.transpose(0, 3, 1, 2).reshape(len(x), -1)


def _pickled(d: dict) -> bytes:
    return pickle.dumps(d, protocol=2)


# The official files are Python 2 pickles: str values are BINSTRING opcodes (bytes in Python 3) and
# arrays name numpy.core.multiarray, which Python 3 never writes. These helpers write the same opcodes.


def _py2_str(b: bytes) -> bytes:
    if len(b) < 256:
        return pickle.SHORT_BINSTRING + bytes([len(b)]) + b
    return pickle.BINSTRING + struct.pack("<i", len(b)) + b


def _py2_int(i: int) -> bytes:
    return pickle.BININT + struct.pack("<i", i)


def _py2_pickle(items: dict[bytes, np.ndarray | list[int] | list[bytes] | bytes]) -> bytes:
    body = b""
    for key, value in items.items():
        body += _py2_str(key)
        if isinstance(value, np.ndarray):
            n, d = value.shape
            body += (
                pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n"
                + pickle.GLOBAL + b"numpy\nndarray\n" + _py2_int(0) + pickle.TUPLE1 + _py2_str(b"b")
                + pickle.TUPLE3 + pickle.REDUCE
                + pickle.MARK + _py2_int(1) + _py2_int(n) + _py2_int(d) + pickle.TUPLE2
                + pickle.GLOBAL + b"numpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1)
                + pickle.TUPLE3 + pickle.REDUCE
                + pickle.MARK + _py2_int(3) + _py2_str(b"|") + pickle.NONE * 3 + _py2_int(-1) + _py2_int(-1)
                + _py2_int(0) + pickle.TUPLE + pickle.BUILD
                + pickle.NEWFALSE + _py2_str(value.tobytes()) + pickle.TUPLE + pickle.BUILD
            )  # fmt: skip
        elif isinstance(value, bytes):
            body += _py2_str(value)
        else:
            enc = _py2_str if value and isinstance(value[0], bytes) else _py2_int
            body += pickle.EMPTY_LIST + pickle.MARK + b"".join(enc(v) for v in value) + pickle.APPENDS
    return pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK + body + pickle.SETITEMS + pickle.STOP


def _cifar10_files() -> tuple[dict[str, bytes], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    files: dict[str, bytes] = {}
    xs, ys = [], []
    for i in range(1, 6):
        x = _images(2, seed=i)
        y = [(2 * i) % 10, (2 * i + 1) % 10]
        label = f"training batch {i} of 5".encode()
        files[f"data_batch_{i}"] = _py2_pickle({b"batch_label": label, b"labels": y, b"data": _rows(x)})
        xs.append(x)
        ys += y
    x_test = _images(3, seed=99)
    y_test = [9, 0, 4]
    files["test_batch"] = _py2_pickle({b"data": _rows(x_test), b"labels": y_test})
    files["batches.meta"] = _py2_pickle({b"label_names": [n.encode() for n in CIFAR10_NAMES]})
    return files, np.concatenate(xs), np.array(ys), x_test, np.array(y_test)


def _tar_gz(members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return buf.getvalue()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(scope="module")
def cifar10():
    files, x_train, y_train, x_test, y_test = _cifar10_files()
    archive = _tar_gz({f"cifar-10-batches-py/{k}": v for k, v in files.items()})
    return archive, files, (x_train, y_train, x_test, y_test)


@pytest.fixture
def server(tmp_path):
    """An http server on 127.0.0.1 serving tmp_path/served; counts the GET requests."""
    served = tmp_path / "served"
    served.mkdir()
    gets: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            gets.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{httpd.server_address[1]}", gets
    finally:
        httpd.shutdown()
        httpd.server_close()


def _check(split, expected, classes=CIFAR10_NAMES):
    x_train, y_train, x_test, y_test, names = split
    ex_train, ey_train, ex_test, ey_test = expected
    assert x_train.dtype == np.uint8 and x_train.shape == (10, 32, 32, 3) and x_train.flags.c_contiguous
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    np.testing.assert_array_equal(x_train, ex_train)
    np.testing.assert_array_equal(y_train, ey_train)
    np.testing.assert_array_equal(x_test, ex_test)
    np.testing.assert_array_equal(y_test, ey_test)
    assert names == classes


def test_http_download_round_trip_and_cache_reuse(tmp_path, server, cifar10):
    archive, _, expected = cifar10
    served, base, gets = server
    (served / "cifar-10-python.tar.gz").write_bytes(archive)
    root = tmp_path / "cache"
    url = f"{base}/cifar-10-python.tar.gz"

    _check(load_cifar("cifar10", root=root, url=url, md5=_md5(archive), progress=True), expected)
    assert gets == ["/cifar-10-python.tar.gz"]
    assert (root / "cifar-10-python.tar.gz").read_bytes() == archive
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temp files left behind"

    _check(load_cifar("cifar10", root=root, url=url, md5=_md5(archive), progress=False), expected)
    assert len(gets) == 1, "second load downloaded again"

    # The archive alone (extraction deleted) is re-extracted, not downloaded again.
    import shutil

    shutil.rmtree(root / "cifar-10-python")
    _check(load_cifar("cifar10", root=root, url=url, md5=_md5(archive), progress=False), expected)
    assert len(gets) == 1


def test_file_url_and_supcon_data_env(tmp_path, monkeypatch, cifar10):
    archive, _, expected = cifar10
    src = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    src.parent.mkdir()
    src.write_bytes(archive)
    monkeypatch.setenv("SUPCON_DATA", str(tmp_path / "env-cache"))
    _check(load_cifar("cifar10", url=src.as_uri(), md5=_md5(archive), progress=False), expected)
    assert (tmp_path / "env-cache" / "cifar-10-python.tar.gz").is_file()


def test_checksum_mismatch_leaves_nothing(tmp_path, server, cifar10):
    archive, _, _ = cifar10
    served, base, _ = server
    (served / "c.tar.gz").write_bytes(archive[:-10] + b"corrupted!")
    root = tmp_path / "cache"
    with pytest.raises(UsageError, match=r"checksum mismatch for http://127\.0\.0\.1:\d+/c\.tar\.gz") as e:
        load_cifar("cifar10", root=root, url=f"{base}/c.tar.gz", md5=_md5(archive), progress=False)
    assert _md5(archive) in str(e.value) and _md5(archive[:-10] + b"corrupted!") in str(e.value)
    assert list(root.iterdir()) == []


def test_bad_cached_archive_is_downloaded_again(tmp_path, server, cifar10):
    archive, _, expected = cifar10
    served, base, gets = server
    (served / "cifar-10-python.tar.gz").write_bytes(archive)
    root = tmp_path / "cache"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(archive[:100])  # an interrupted copy
    url = f"{base}/cifar-10-python.tar.gz"
    _check(load_cifar("cifar10", root=root, url=url, md5=_md5(archive), progress=False), expected)
    assert len(gets) == 1


def test_network_errors_say_how_to_supply_data(tmp_path, server):
    _, base, _ = server
    with pytest.raises(UsageError, match=r"could not download .*/missing\.tar\.gz \(HTTP 404.*--data PATH"):
        load_cifar("cifar10", root=tmp_path / "c", url=f"{base}/missing.tar.gz", progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"
    with pytest.raises(UsageError, match=r"could not download http://127\.0\.0\.1.*--data PATH"):
        load_cifar("cifar10", root=tmp_path / "c", url=url, progress=False)
    assert list((tmp_path / "c").iterdir()) == []


def test_default_url_and_md5_are_official(tmp_path, monkeypatch):
    seen = {}

    def fake_urlopen(url, timeout):
        seen["url"] = url
        raise OSError("no network here")

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    with pytest.raises(UsageError, match="cifar-100-python.tar.gz"):
        load_cifar("cifar100", root=tmp_path, progress=False)
    assert seen["url"] == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


@pytest.mark.parametrize(
    "bad",
    [
        ("../evil", tarfile.REGTYPE, ""),
        ("/tmp/evil-abs", tarfile.REGTYPE, ""),
        ("cifar-10-batches-py/link", tarfile.SYMTYPE, "../../evil"),
        ("cifar-10-batches-py/hard", tarfile.LNKTYPE, "/etc/passwd"),
        ("cifar-10-batches-py/dev", tarfile.CHRTYPE, ""),
    ],
)
def test_unsafe_members_are_refused(tmp_path, cifar10, bad):
    _, files, _ = cifar10
    name, kind, target = bad
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    archive = _tar_gz({f"cifar-10-batches-py/{k}": v for k, v in files.items()}, extra=[info])
    src = tmp_path / "src" / "cifar-10-python.tar.gz"
    src.parent.mkdir()
    src.write_bytes(archive)
    root = tmp_path / "deep" / "cache"
    with pytest.raises(UsageError, match=r"refusing archive .*unsafe"):
        load_cifar("cifar10", root=root, url=src.as_uri(), md5=_md5(archive), progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"], "extraction left behind"
    assert not (tmp_path / "deep" / "evil").exists()
    # The same archive given as --data is refused too.
    with pytest.raises(UsageError, match="unsafe"):
        load_cifar("cifar10", path=src)


def test_extracted_copy_via_path(tmp_path, cifar10):
    _, files, expected = cifar10
    top = tmp_path / "copy"
    batches = top / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for k, v in files.items():
        (batches / k).write_bytes(v)
    _check(load_cifar("cifar10", path=top), expected)
    _check(load_cifar("cifar10", path=batches), expected)

    (batches / "data_batch_3").unlink()
    with pytest.raises(
        UsageError, match=r"incomplete CIFAR-10 copy in .*cifar-10-batches-py: missing data_batch_3"
    ):
        load_cifar("cifar10", path=top)
    with pytest.raises(UsageError, match="is not a CIFAR-10 copy"):
        load_cifar("cifar10", path=tmp_path / "copy" / "..")
    with pytest.raises(UsageError, match="does not exist"):
        load_cifar("cifar10", path=tmp_path / "nope")


def test_archive_via_path_reads_without_writing(tmp_path, cifar10):
    archive, _, expected = cifar10
    data = tmp_path / "data"
    data.mkdir()
    src = data / "cifar-10-python.tar.gz"
    src.write_bytes(archive)
    _check(load_cifar("cifar10", path=src, root=tmp_path / "unused"), expected)
    assert [p.name for p in data.iterdir()] == ["cifar-10-python.tar.gz"]
    assert not (tmp_path / "unused").exists()
    _check(load_cifar("cifar10", path=data), expected)  # the folder holding the archive
    with pytest.raises(UsageError, match="checksum mismatch"):
        load_cifar("cifar10", path=src, md5="0" * 32)


def test_corrupt_inputs_name_the_file(tmp_path, cifar10):
    archive, files, _ = cifar10
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive[: len(archive) // 2])
    with pytest.raises(UsageError, match=r"truncated\.tar\.gz.*corrupt or truncated"):
        load_cifar("cifar10", path=truncated)
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not an archive at all" * 10)
    with pytest.raises(UsageError, match=r"garbage\.tar\.gz"):
        load_cifar("cifar10", path=garbage)

    folder = tmp_path / "broken"
    folder.mkdir()
    for k, v in files.items():
        (folder / k).write_bytes(v)
    (folder / "data_batch_2").write_bytes(files["data_batch_2"][:50])
    with pytest.raises(UsageError, match=r"cannot read .*data_batch_2"):
        load_cifar("cifar10", path=folder)

    # A pickle that would call anything but numpy's array constructors is refused, not run.
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(UsageError, match=r"data_batch_2: not a CIFAR python batch file"):
        load_cifar("cifar10", path=folder)

    (folder / "data_batch_2").write_bytes(_pickled({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(UsageError, match=r"data_batch_2: expected uint8 data of shape \[N, 3072\]"):
        load_cifar("cifar10", path=folder)


def test_archive_without_batches_is_rejected_and_cleaned(tmp_path):
    archive = _tar_gz({"something/else.txt": b"hello"})
    src = tmp_path / "x.tar.gz"
    src.write_bytes(archive)
    root = tmp_path / "cache"
    with pytest.raises(UsageError, match="is not a CIFAR-10 archive"):
        load_cifar("cifar10", root=root, url=src.as_uri(), md5=_md5(archive), progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["x.tar.gz"]


def test_cifar100_fine_labels(tmp_path):
    x_train, x_test = _images(4, 1), _images(2, 2)
    fine, coarse = [0, 99, 42, 7], [0, 19, 3, 1]
    names = [f"class{i:02d}" for i in range(100)]
    members = {
        "cifar-100-python/train": _pickled(
            {b"data": _rows(x_train), b"fine_labels": fine, b"coarse_labels": coarse}
        ),
        "cifar-100-python/test": _pickled(
            {b"data": _rows(x_test), b"fine_labels": [5, 6], b"coarse_labels": [1, 1]}
        ),
        "cifar-100-python/meta": _pickled(
            {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"c"] * 20}
        ),
    }
    archive = _tar_gz(members)
    src = tmp_path / "cifar-100-python.tar.gz"
    src.write_bytes(archive)
    for split in (
        load_cifar("cifar100", root=tmp_path / "cache", url=src.as_uri(), md5=_md5(archive), progress=False),
        load_cifar("cifar100", path=src),
        load_cifar("cifar100", path=tmp_path / "cache" / "cifar-100-python"),
    ):
        xa, ya, xb, yb, classes = split
        np.testing.assert_array_equal(xa, x_train)
        np.testing.assert_array_equal(xb, x_test)
        assert ya.tolist() == fine and yb.tolist() == [5, 6]
        assert classes == names


def test_python3_pickles_with_str_keys(tmp_path, cifar10):
    _, files, expected = cifar10
    folder = tmp_path / "repickled"
    folder.mkdir()
    for k, v in files.items():
        d = pickle.loads(v, encoding="bytes")
        (folder / k).write_bytes(pickle.dumps({key.decode(): val for key, val in d.items()}, protocol=5))
    _check(load_cifar("cifar10", path=folder), expected)


def test_unknown_name():
    with pytest.raises(UsageError, match="unknown CIFAR dataset 'cifar1000'"):
        load_cifar("cifar1000")


def test_channel_order_is_rgb_nhwc(tmp_path, cifar10):
    # One hand-made image: red channel all 10, green 20, blue 30, and a marker at row 1, column 2.
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    row[1 * 32 + 2] = 200
    _, files, _ = cifar10
    folder = tmp_path / "c"
    folder.mkdir()
    for k, v in files.items():
        (folder / k).write_bytes(v)
    (folder / "test_batch").write_bytes(_pickled({b"data": row[None], b"labels": [3]}))
    x_test = load_cifar("cifar10", path=folder)[2]
    assert x_test.shape == (1, 32, 32, 3)
    assert x_test[0, 0, 0].tolist() == [10, 20, 30]
    assert x_test[0, 1, 2].tolist() == [200, 20, 30]
