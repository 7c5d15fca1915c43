"""Every output replaces only a regular file: a device node, FIFO, socket or folder is refused."""

import os

import pytest

from _files import KINDS, make_special  # tests/ is on sys.path under pytest
from supcon.core.errors import UsageError
from supcon.core.files import atomic_write, check_regular_output


def _write(tmp):
    with open(tmp, "w") as f:
        f.write("new")


def _special(tmp_path, kind):
    if kind == "device node":
        return "/dev/null"
    return make_special(tmp_path / f"out-{kind}", kind)


@pytest.mark.parametrize("kind", [*KINDS, "device node"])
def test_special_files_are_never_replaced(tmp_path, kind):
    path = _special(tmp_path, kind)
    with pytest.raises(UsageError, match="not a regular file") as e:
        atomic_write(path, _write)
    assert "\n" not in str(e.value)
    assert os.path.lexists(path) and not os.path.isfile(path)
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_regular_files_and_links_to_them_are_replaced(tmp_path):
    (tmp_path / "a").write_text("old")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for name in ("a", "b", "c"):
        check_regular_output(tmp_path / name)
        atomic_write(tmp_path / name, _write)
        assert (tmp_path / name).read_text() == "new"
