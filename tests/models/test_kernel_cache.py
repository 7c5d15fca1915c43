"""The kernel library is loaded only from a folder no other user can write, and only if intact."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supcon.models import kernels

PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("PLANTED_MARKER"), "w");
    if (f) { fputs("loaded", f); fclose(f); }
}
"""


def _status(env: dict) -> str:
    # A fresh process: the library is loaded once per process, and a bad one may crash it.
    code = (
        "import torch, supcon.models.kernels as k; s = k.kernel_status(); "
        "x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last); "
        "assert torch.equal(k.max_pool2_relu(x), torch.nn.functional.max_pool2d(x, 2).relu()); print(s)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "SUPCON_KERNELS": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def _cc() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        pytest.skip("no C compiler")
    return cc


def _plant(folder: Path, cc: str, marker: Path) -> Path:
    """A library under the expected name whose loading leaves ``marker`` behind."""
    folder.mkdir(parents=True, exist_ok=True)
    src = folder.parent / "planted.c"
    src.write_text(PLANTED)
    lib = folder / kernels._library_name(cc)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib


def test_library_in_a_world_writable_cache_folder_is_not_loaded(tmp_path):
    cc = _cc()
    marker = tmp_path / "marker"
    lib = _plant(tmp_path / "cache" / "kernels", cc, marker)
    os.chmod(lib.parent, 0o777)
    status = _status({"SUPCON_DATA": str(tmp_path / "cache"), "CC": cc, "PLANTED_MARKER": str(marker)})
    assert not marker.exists(), "the planted library was loaded"
    assert status.startswith("in use (") and "supcon-kernels-" in status, status
    assert "writable by other users" in status and str(lib.parent) in status, status


def test_library_owned_by_another_user_is_not_loaded(tmp_path):
    if os.getuid() != 0:
        pytest.skip("giving a file to another user needs root")
    cc = _cc()
    marker = tmp_path / "marker"
    lib = _plant(tmp_path / "cache" / "kernels", cc, marker)
    os.chown(lib, 12345, 12345)
    status = _status({"SUPCON_DATA": str(tmp_path / "cache"), "CC": cc, "PLANTED_MARKER": str(marker)})
    assert not marker.exists(), "the planted library was loaded"
    assert "rebuilt: the cached library could have been written by another user" in status, status
    assert os.stat(lib).st_uid == os.getuid()  # replaced by our own build

    os.chown(lib.parent, 12345, 12345)  # the folder itself is another user's
    status = _status({"SUPCON_DATA": str(tmp_path / "cache"), "CC": "false", "PLANTED_MARKER": str(marker)})
    assert not marker.exists()
    assert status.startswith("unavailable (false failed"), status


def test_library_without_a_checksum_is_not_loaded(tmp_path):
    cc = _cc()
    marker = tmp_path / "marker"
    _plant(tmp_path / "cache" / "kernels", cc, marker)
    status = _status({"SUPCON_DATA": str(tmp_path / "cache"), "CC": "false", "PLANTED_MARKER": str(marker)})
    assert not marker.exists()
    assert status.startswith("unavailable"), status


def test_truncated_library_is_rebuilt(tmp_path):
    if kernels._library() is None:
        pytest.skip(f"C kernels not built here: {kernels.kernel_status()}")
    built = Path(kernels.kernel_status().split("(", 1)[1].split(")")[0])
    cc = _cc()
    folder = tmp_path / "cache" / "kernels"
    folder.mkdir(parents=True, mode=0o700)
    lib = folder / kernels._library_name(cc)
    shutil.copy(built, lib)
    shutil.copy(kernels._sidecar(built), kernels._sidecar(lib))
    assert _status({"SUPCON_DATA": str(tmp_path / "cache"), "CC": cc}) == f"in use ({lib})"  # intact: reused
    with open(lib, "r+b") as f:
        f.truncate(lib.stat().st_size // 2)
    status = _status({"SUPCON_DATA": str(tmp_path / "cache"), "CC": cc})
    rebuilt = "rebuilt: the cached library does not match its checksum (truncated or corrupt)"
    assert status == f"in use ({lib}); {rebuilt}"
    assert _status({"SUPCON_DATA": str(tmp_path / "cache"), "CC": cc}) == f"in use ({lib})"


def test_folder_checks(tmp_path):
    root = tmp_path / "cache"
    folder = root / "kernels"
    folder.mkdir(parents=True)
    os.chmod(root, 0o755)
    os.chmod(folder, 0o700)
    assert kernels._untrusted(folder, root) == ""
    os.chmod(root, 0o775)
    assert "writable by other users" in kernels._untrusted(folder, root)
    os.chmod(root, 0o1777)  # sticky, yet inside the cache: still refused
    assert str(root) in kernels._untrusted(folder, root)
    os.chmod(root, 0o755)
    os.chmod(tmp_path, 0o1777)  # above the cache root, a sticky shared folder (as /tmp) is fine
    assert kernels._untrusted(folder, root) == ""
    os.chmod(tmp_path, 0o777)
    assert f"{tmp_path} is writable by other users" in kernels._untrusted(folder, root)
    os.chmod(tmp_path, 0o755)
