"""Run-folder lock: one process at a time; never stale after its holder is gone."""

import json
import os
import signal
import subprocess
import sys

import pytest

from supcon.core.errors import UsageError
from supcon.runs.lock import RunLock, clear_run_folder

HOLD = (
    "import sys, time; from supcon.runs.lock import RunLock; "
    "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock on tmp_path/run."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run), "--out", str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield run, proc
    finally:
        proc.kill()
        proc.wait()


def test_second_process_is_refused_with_the_holder_named(holder):
    run, proc = holder
    with pytest.raises(UsageError) as e:
        RunLock(run).acquire()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"run folder {run} is in use by pid {proc.pid} on ")
    assert f"--out {run}" in msg and " since " in msg


def test_lock_is_free_once_the_holder_is_killed(holder):
    run, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / ".lock").is_file()  # left behind by the killed holder, yet it blocks nothing
    with RunLock(run) as lock:
        assert lock.held
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert not (run / ".lock").exists()


def test_release_lets_the_next_one_in_and_a_second_lock_in_the_same_process_is_refused(tmp_path):
    run = tmp_path / "a" / "run"
    first = RunLock(run).acquire()
    assert run.is_dir()
    with pytest.raises(UsageError, match=f"in use by pid {os.getpid()} "):
        RunLock(run).acquire()
    first.release()
    first.release()  # twice is harmless
    with RunLock(run):
        pass


def test_a_lock_file_alone_blocks_nothing(tmp_path):
    (tmp_path / ".lock").write_text(
        json.dumps({"pid": os.getpid(), "host": "x", "since": "y", "command": "z"})
    )
    with RunLock(tmp_path) as lock:
        assert lock.held
    (tmp_path / ".lock").write_text("garbage")
    with RunLock(tmp_path):
        pass


def test_unopenable_run_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="^cannot open run folder .*file/run: Not a directory$"):
        RunLock(tmp_path / "file" / "run").acquire()


def test_clear_run_folder_keeps_the_folder_the_lock_and_what_links_point_to(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    with RunLock(run):
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "ce-e1.pt").write_text("x")
        (run / "metrics.jsonl").write_text("{}")
        (run / ".hidden").write_text("x")
        (run / "link").symlink_to(outside)
        clear_run_folder(run)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
        assert (outside / "keep.txt").is_file()
        with pytest.raises(UsageError):  # still locked
            RunLock(run).acquire()
