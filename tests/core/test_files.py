"""atomic_write: a write error is one line naming the path, and the previous file survives."""

import errno
import os

import pytest

from supcon.core import files
from supcon.core.errors import UsageError
from supcon.core.files import atomic_write


def _writer(text: str):
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return write


def _failing(code: int):
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("partial")  # a half-written temporary file, as a full disk leaves
        raise OSError(code, os.strerror(code))

    return write


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_write_error_is_one_line_and_keeps_the_old_file(tmp_path, code):
    path = tmp_path / "out.txt"
    atomic_write(path, _writer("old"))
    with pytest.raises(UsageError) as e:
        atomic_write(path, _failing(code))
    assert str(e.value) == f"cannot write {path}: {os.strerror(code)}"
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary file left


def test_error_creating_the_temporary_file(tmp_path, monkeypatch):
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.tempfile, "mkstemp", full)
    with pytest.raises(UsageError, match=f"^cannot write {tmp_path}/x: No space left on device$"):
        atomic_write(tmp_path / "x", _writer("new"))


def test_parent_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("a file")
    for path in (tmp_path / "f" / "x.pt", tmp_path / "f" / "sub" / "x.pt"):
        with pytest.raises(UsageError) as e:
            atomic_write(path, _writer("new"))
        assert str(e.value) == f"cannot write {path}: {tmp_path / 'f'} is not a folder"
    assert (tmp_path / "f").read_text() == "a file"


def test_name_too_long(tmp_path):
    path = tmp_path / ("x" * 300)
    with pytest.raises(UsageError, match="^cannot write .*x: File name too long$"):
        atomic_write(path, _writer("new"))
    assert list(tmp_path.iterdir()) == []


def test_read_only_folder(tmp_path):
    if os.getuid() == 0:
        pytest.skip("root writes into read-only folders")
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(UsageError, match="^cannot write .*: Permission denied$"):
            atomic_write(tmp_path / "x", _writer("new"))
    finally:
        os.chmod(tmp_path, 0o700)


def test_other_errors_pass_through_and_clean_up(tmp_path):
    def boom(tmp: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x", boom)
    assert list(tmp_path.iterdir()) == []
