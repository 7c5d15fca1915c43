"""A home folder that does not exist is never created: not by the cache, the compiled kernels or
matplotlib. A wrong ``$HOME`` (a service account, a container) must not leave folders at the root."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from supcon.core.errors import UsageError
from supcon.core.files import default_root, matplotlib_outside_missing_home
from supcon.data.diskio import cache_root


def _homes(tmp_path: Path) -> dict[str, Path]:
    """Home folders that cannot hold a cache: missing, missing two levels down, a regular file."""
    file = tmp_path / "home-file"
    file.write_text("not a folder")
    return {"missing": tmp_path / "nohome", "nested": tmp_path / "a" / "b" / "home", "file": file}


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SUPCON_DATA", "MPLCONFIGDIR")}
    env.pop("XDG_CACHE_HOME", None)
    env.pop("XDG_CONFIG_HOME", None)
    return {**env, "HOME": str(home), **extra}


@pytest.mark.parametrize("kind", ["missing", "nested", "file"])
def test_the_cache_root_refuses_a_home_that_is_not_a_folder(tmp_path, monkeypatch, kind):
    home = _homes(tmp_path)[kind]
    monkeypatch.delenv("SUPCON_DATA", raising=False)
    monkeypatch.setenv("HOME", str(home))
    for root in (default_root, cache_root):  # one rule, whichever layer asks
        with pytest.raises(UsageError, match=rf"home folder {home} does not exist.*set SUPCON_DATA"):
            root()
    assert cache_root(tmp_path / "given") == tmp_path / "given"  # an explicit folder needs no home
    monkeypatch.setenv("SUPCON_DATA", str(tmp_path / "data"))
    assert default_root() == cache_root() == tmp_path / "data"
    assert not (tmp_path / "data").exists()  # naming the folder creates nothing
    assert kind == "file" or not home.exists()


def test_matplotlib_is_pointed_at_a_temporary_folder_only_without_a_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # a home that exists: matplotlib's own choice stands
    matplotlib_outside_missing_home()
    assert "MPLCONFIGDIR" not in os.environ
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    matplotlib_outside_missing_home()
    chosen = Path(os.environ["MPLCONFIGDIR"])
    assert chosen.is_dir() and not str(chosen).startswith(str(tmp_path / "nohome"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mine"))  # the user's own setting is kept
    matplotlib_outside_missing_home()
    assert os.environ["MPLCONFIGDIR"] == str(tmp_path / "mine")
    assert not (tmp_path / "nohome").exists()


def test_kernels_are_built_in_a_private_temporary_folder_without_a_home(tmp_path):
    home = tmp_path / "nohome"
    code = (
        "import torch, supcon.models.kernels as k; "
        "x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last); "
        "assert torch.equal(k.max_pool2_relu(x), torch.nn.functional.max_pool2d(x, 2).relu()); "
        "print(k.kernel_status())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(home, SUPCON_KERNELS="1"), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""  # no error and no warning: a fallback, silently
    status = proc.stdout.strip()
    if "C compiler" not in status:
        assert "built in" in status and "home folder" in status, status
    assert not home.exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_run_trains_and_plots_without_creating_the_home_folder(tmp_path, kind):
    home = _homes(tmp_path)[kind]
    out = tmp_path / "run"
    args = ["compare", "--dataset", "digits", "--epochs", "1", "--batch-size", "128", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-m", "supcon", *args, "--out", str(out)], env=_env(home), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "results.json").is_file() and (out / "curves.png").is_file()  # matplotlib ran
    assert home.is_file() if kind == "file" else not home.exists()
    assert not (tmp_path / ".cache").exists() and not (tmp_path / ".config").exists()
