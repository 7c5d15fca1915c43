"""Checkpoints: stale temporary files, the latest pick, and an unreadable newest checkpoint."""

import os
import subprocess
import sys

import pytest
import torch

from supcon.core.checkpoint import latest_checkpoint, load_checkpoint, load_latest_checkpoint, save_checkpoint
from supcon.core.errors import UsageError
from supcon.core.files import remove_stale_temps


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid until it is reused


def test_kill_during_a_write_leaves_nothing_after_the_next_save(tmp_path):
    # What a writer killed mid-write leaves: a 0-byte temporary file with its pid in the name.
    dead = tmp_path / f".ce-e0001.pt.{_dead_pid()}.k3j4h5.tmp"
    dead.touch()
    live = tmp_path / f".ce-e0001.pt.{os.getppid()}.a1b2c3.tmp"  # a live writer (our parent): kept
    live.touch()
    old_style = tmp_path / ".ce-e0001.pt.x8y7z6q5.tmp"  # an older version's name, without a pid
    old_style.touch()
    other = tmp_path / ".notes.txt.123.abc.tmp"  # not a checkpoint's: not ours to judge
    other.touch()
    save_checkpoint({"epoch": 2}, tmp_path / "ce-e0002.pt")
    assert not dead.exists()
    assert live.exists() and old_style.exists() and other.exists()
    assert latest_checkpoint(tmp_path, "ce") == tmp_path / "ce-e0002.pt"
    # Holding the run lock, every leftover is a dead writer's.
    save_checkpoint({"epoch": 3}, tmp_path / "ce-e0003.pt", locked=True)
    assert not live.exists() and not old_style.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".notes.txt.123.abc.tmp",
        "ce-e0002.pt",
        "ce-e0003.pt",
    ]


def test_own_temporary_files_are_not_removed(tmp_path):
    mine = tmp_path / f".ce-e0001.pt.{os.getpid()}.abcdef.tmp"
    mine.touch()
    assert remove_stale_temps(tmp_path, "*.pt") == []
    assert mine.exists()


def test_latest_checkpoint_never_picks_temporary_or_foreign_files(tmp_path):
    for name in [
        "ce-e0002.pt",
        "ce-e0010.pt",
        "ce-e0010.000050.pt",
        "pretrain-e0099.pt",
        "ce-extra-e0500.pt",
    ]:
        torch.save({"name": name}, tmp_path / name)
    for name in [".ce-e0011.pt.123.abc.tmp", "ce-e0012.pt.tmp", ".ce-e0013.pt", "ce-eval.pt"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "ce-e0014.pt").mkdir()  # not a file
    os.utime(tmp_path / "ce-e0002.pt", (2e9, 2e9))  # newest by mtime (a copied folder), but epoch 2
    assert latest_checkpoint(tmp_path, "ce") == tmp_path / "ce-e0010.000050.pt"
    assert latest_checkpoint(tmp_path, "linear") is None


def test_keep_deletes_the_least_advanced_checkpoints(tmp_path):
    for name in ["ce-e0001.pt", "ce-e0002.pt", "ce-e0002.000010.pt"]:
        save_checkpoint({}, tmp_path / name, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ce-e0002.000010.pt", "ce-e0002.pt"]


def test_unreadable_newest_checkpoint_names_the_older_one(tmp_path):
    save_checkpoint({"epoch": 1}, tmp_path / "ce-e0001.pt")
    save_checkpoint({"epoch": 2}, tmp_path / "ce-e0002.pt")
    newest = tmp_path / "ce-e0002.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    with pytest.raises(UsageError) as e:
        load_latest_checkpoint(tmp_path, "ce")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"checkpoint {newest} is unreadable (")
    assert msg.endswith("; an older one exists: ce-e0001.pt; delete ce-e0002.pt to resume from it")
    newest.unlink()
    path, state = load_latest_checkpoint(tmp_path, "ce")
    assert path.name == "ce-e0001.pt" and state == {"epoch": 1}


def test_unreadable_only_checkpoint_has_no_hint(tmp_path):
    (tmp_path / "ce-e0001.pt").write_bytes(b"")
    with pytest.raises(
        UsageError, match=r"^checkpoint .*ce-e0001.pt is unreadable \([A-Za-z]+(: [^\n]*)?\)$"
    ):
        load_checkpoint(tmp_path / "ce-e0001.pt")
    assert load_latest_checkpoint(tmp_path / "none", "ce") is None


class _RunsCode:
    """A pickle payload: unpickling calls ``fn(*args)``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker):
    code = f"open({str(marker)!r}, 'w').write('ran')"
    return {
        "exec": _RunsCode(exec, code),
        "eval": _RunsCode(eval, code),
        "os.system": _RunsCode(os.system, f"touch {marker}"),
        "subprocess": _RunsCode(subprocess.call, ["touch", str(marker)]),
        "plain class": _RunsCode,  # a global outside the allow-list, even without a call
    }


@pytest.mark.parametrize("name", list(_payloads("x")))
@pytest.mark.parametrize("where", ["top", "nested"])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, name, where):
    marker = tmp_path.parent / f"ran-{name.replace(' ', '-')}-{where}"
    payload = _payloads(marker)[name]
    state = {"epoch": 1, "model": {"w": torch.ones(2)}}
    if where == "top":
        state = payload
    else:  # hidden deep inside an otherwise ordinary checkpoint
        state["optimizer"] = {"state": {0: {"extra": [payload]}}}
    path = tmp_path / "pretrain-e0001.pt"
    torch.save(state, path)
    with pytest.raises(UsageError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_every_type_a_real_checkpoint_holds_loads_without_unpickling_code(tmp_path):
    from supcon.train.optim import build_optimizer, build_scheduler

    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, "sgd", lr=0.1, momentum=0.9)
    sched = build_scheduler(opt, "cosine", total_steps=10, warmup_steps=2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    rng = torch.get_rng_state()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "g_data": torch.Generator().manual_seed(1).get_state(),
        "streams": [{"augment": {"device": "cpu", "state": rng}, "torch": rng}],
        "history": [{"loss": 1.5, "acc": None}],
        "config": {"seed": 0, "data": {"mean": [0.5, 0.5], "name": "digits"}},
    }
    save_checkpoint(state, tmp_path / "pretrain-e0001.pt")
    loaded = load_checkpoint(tmp_path / "pretrain-e0001.pt")
    assert loaded["scheduler"]["_last_lr"] == sched.state_dict()["_last_lr"]
    assert torch.equal(loaded["streams"][0]["torch"], rng)
