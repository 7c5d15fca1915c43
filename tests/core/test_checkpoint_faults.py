"""A full disk while saving a checkpoint, and checkpoint metadata read back: one line, the previous
checkpoint intact, no temporary file left."""

import errno

import pytest
import torch

from supcon.core import checkpoint as ckpt_mod
from supcon.core.checkpoint import check_checkpoint, latest_checkpoint, save_checkpoint
from supcon.core.errors import UsageError


def _failing_save(error):
    def save(state, tmp):
        with open(tmp, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")  # what a writer leaves when the disk fills mid-write
        raise error

    return save


FULL_DISK = [
    RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1728 vs 1616"),
    RuntimeError(
        "[enforce fail at inline_container.cc:471] . PytorchStreamWriter failed writing file data/0"
    ),
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    OSError(errno.EROFS, "Read-only file system"),
]


@pytest.mark.parametrize("error", FULL_DISK, ids=lambda e: str(e)[:30])
def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch, error):
    save_checkpoint({"epoch": 1, "w": torch.arange(4)}, tmp_path / "ce-e0001.pt")
    before = (tmp_path / "ce-e0001.pt").read_bytes()
    monkeypatch.setattr(ckpt_mod.torch, "save", _failing_save(error))
    with pytest.raises(UsageError) as e:
        save_checkpoint({"epoch": 2}, tmp_path / "ce-e0002.pt")
    msg = str(e.value)
    assert msg.startswith(f"cannot write {tmp_path / 'ce-e0002.pt'}: ") and "\n" not in msg
    assert "inline_container" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ce-e0001.pt"]
    assert (tmp_path / "ce-e0001.pt").read_bytes() == before
    assert latest_checkpoint(tmp_path, "ce") == tmp_path / "ce-e0001.pt"


def test_other_runtime_errors_are_not_disguised(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_mod.torch, "save", _failing_save(RuntimeError("a bug: tensor of meta device")))
    with pytest.raises(RuntimeError, match="a bug"):
        save_checkpoint({"epoch": 2}, tmp_path / "ce-e0002.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_training_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from supcon.cli import main

    real, calls = torch.save, []

    def save(state, tmp):
        calls.append(1)
        if len(calls) == 2:
            return _failing_save(RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos"))(
                state, tmp
            )
        return real(state, tmp)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    out = tmp_path / "run"
    args = [
        "train-ce",
        "--dataset",
        "digits",
        "--epochs",
        "2",
        "--batch-size",
        "256",
        "--quiet",
        "--out",
        str(out),
    ]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "ce-e0002.pt" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ce-e0001.pt"]
    torch.load(out / "checkpoints" / "ce-e0001.pt", weights_only=True)  # whole


def _good():
    return {
        "phase": "ce", "epoch": 1, "step": 0, "history": [{"loss": 1.0}], "model": {}, "optimizer": {},
        "scheduler": {}, "scaler": {}, "config": {}, "streams": [],
        "g_data": torch.zeros(8, dtype=torch.uint8),
    }  # fmt: skip


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("phase", "pretrain", "phase must be one of ce"),
        ("epoch", "1", "epoch must be an integer"),
        ("epoch", -1, "epoch must be at least 0"),
        ("epoch", 10**30, "epoch must be at most 5"),
        ("step", None, "step is missing"),
        ("history", [1], "history must hold one record"),
        ("history", [], "history must hold one record"),
        ("model", [1, 2], "model must be a mapping"),
        ("g_data", [1, 2], "g_data must be a generator state"),
        ("partial", {"loss": "x"}, "partial.loss must be a finite number"),
        (
            "partial",
            {"loss": 1.0, "correct": 1, "seen": 2, "classifies": "no"},
            "classifies must be true or false",
        ),
    ],
)
def test_checkpoint_metadata_is_checked(tmp_path, key, value, match):
    state = _good() | {key: value}
    check_checkpoint(_good(), tmp_path / "ce-e0001.pt", "ce", 5)
    with pytest.raises(UsageError, match=match) as e:
        check_checkpoint(state, tmp_path / "ce-e0001.pt", "ce", 5)
    assert "ce-e0001.pt" in str(e.value)
    with pytest.raises(UsageError, match="not a supcon checkpoint"):
        check_checkpoint([1, 2], tmp_path / "x.pt", "ce", 5)


@pytest.mark.parametrize(
    "text, reason",
    [
        ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })',
         "No space left on device"),
        ("Error while serializing: I/O error: Disk quota exceeded (os error 122)", "Disk quota exceeded"),
    ],
)  # fmt: skip
def test_a_full_disk_while_saving_weights_keeps_the_previous_file(tmp_path, monkeypatch, text, reason):
    from safetensors import SafetensorError

    from supcon.core.checkpoint import save_weights

    net = torch.nn.Linear(2, 2)
    save_weights(net, tmp_path / "ce.safetensors")
    before = (tmp_path / "ce.safetensors").read_bytes()

    def full(tensors, tmp, metadata=None):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise SafetensorError(text)

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with pytest.raises(UsageError, match=f"cannot write .*ce.safetensors: {reason}$"):
        save_weights(net, tmp_path / "ce.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["ce.safetensors"]
    assert (tmp_path / "ce.safetensors").read_bytes() == before
