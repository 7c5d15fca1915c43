"""Nothing the user did not ask to replace is lost: --overwrite replaces only recognisable run folders,
inputs inside --out are refused, --resume continues only the command that made the folder."""

import json

import pytest

import supcon
from supcon.core.config import Config
from supcon.core.errors import UsageError
from supcon.runs.folder import (
    check_inputs_outside,
    check_resume_command,
    check_run_dir,
    recognise_run_folder,
    write_run_info,
)

TINY = {"data.dataset": "digits", "ce.epochs": 1, "ce.batch_size": 256, "precision": "fp32"}


def _run_folder(path, extra=()):
    """A folder laid out as a finished run (no training needed)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(Config().to_yaml())
    (path / "metrics.jsonl").write_text("")
    (path / "results.json").write_text("{}")
    (path / "weights").mkdir()
    (path / "checkpoints").mkdir()
    write_run_info(path, "train-ce")
    for name in extra:
        (path / name).write_text("x")
    return path


def _snapshot(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "files",
    [
        {"config.yaml": "name: my project\nversion: 3\n", "notes.txt": "precious"},  # another tool's config
        {"config.yaml": "model: {feature_dim: abc}\n"},  # config keys of supcon, wrong types
        {"config.yaml": "[1, 2, 3]\n"},
        {"config.yaml": "\x00\x01binary"},
        {"model.json": '{"format": 1, "weights": "mine"}'},  # only a model.json, someone else's
        {"config.yaml": Config().to_yaml(), "model.json": "[]"},
        {"config.yaml": Config().to_yaml(), "src": None},  # a run config next to a source folder
        {"config.yaml": Config().to_yaml(), "weights": None, "weights/thesis.tex": "mine"},
        {"config.yaml": Config().to_yaml(), "run.json": '{"tool": "other"}'},
    ],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_folders_are_never_replaced(tmp_path, files, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in files.items():
        (out / name).mkdir() if text is None else (out / name).write_text(text)
    before = _snapshot(out)
    with pytest.raises(UsageError) as e:
        check_run_dir(out, overwrite=overwrite, resume=False)
    assert "\n" not in str(e.value)
    assert _snapshot(out) == before


def test_a_run_folder_and_a_failed_start_are_recognised(tmp_path):
    run = _run_folder(tmp_path / "run", extra=("curves.png", "report.md"))
    recognise_run_folder(run)
    check_run_dir(run, overwrite=True, resume=False)
    with pytest.raises(UsageError, match="not empty"):
        check_run_dir(run, overwrite=False, resume=False)
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "config.yaml").write_text(Config().to_yaml())
    check_run_dir(stub, overwrite=False, resume=False)  # a failed start of supcon's own


def test_overwrite_through_the_api_keeps_a_foreign_folder(tmp_path):
    out = tmp_path / "proj"
    (out / "src").mkdir(parents=True)
    (out / "src" / "main.py").write_text("print(1)")
    (out / "config.yaml").write_text("name: x\n")
    before = _snapshot(out)
    with pytest.raises(UsageError, match="not a supcon run folder"):
        supcon.run("train-ce", out=out, overrides=TINY, overwrite=True, progress=False)
    assert _snapshot(out) == before


@pytest.mark.parametrize("inside", ["", "weights/ce.safetensors", "sub/dir", "./weights/../data"])
def test_inputs_inside_out_are_refused(tmp_path, inside):
    out = tmp_path / "run"
    with pytest.raises(UsageError, match="inside --out"):
        check_inputs_outside(out, {"--from": None, "--pretrained": str(out / inside)})
    check_inputs_outside(out, {"--data": tmp_path / "run2", "--from": tmp_path})  # beside or above: fine


def test_linear_from_its_own_out_keeps_the_source_run(tmp_path):
    src = _run_folder(tmp_path / "src")
    before = _snapshot(src)
    with pytest.raises(UsageError, match="inside --out"):
        supcon.run("linear", out=src, from_dir=src, overwrite=True, progress=False)
    with pytest.raises(UsageError, match="inside --out"):
        supcon.run(
            "train-ce", out=src, overwrite=True, progress=False,
            overrides=TINY | {"model.pretrained": str(src / "weights" / "ce.safetensors")},
        )  # fmt: skip
    assert _snapshot(src) == before


def test_resume_checks_the_command(tmp_path):
    run = _run_folder(tmp_path / "run")
    check_resume_command(run, "train-ce", ("ce",))
    for command, phases in (("pretrain", ("pretrain",)), ("compare", ("ce", "pretrain", "linear"))):
        with pytest.raises(UsageError, match="it is a train-ce run"):
            check_resume_command(run, command, phases)
    (run / "run.json").unlink()  # an older folder: judged by its checkpoints
    (run / "checkpoints" / "ce-e0001.pt").write_bytes(b"")
    with pytest.raises(UsageError, match="ce checkpoints"):
        check_resume_command(run, "pretrain", ("pretrain",))
    check_resume_command(run, "compare", ("ce", "pretrain", "linear"))
    (run / "run.json").write_text(json.dumps({"command": ["x"] * 10}))
    with pytest.raises(UsageError, match="command must be a string"):
        check_resume_command(run, "train-ce", ("ce",))


def test_pretrain_resume_on_a_train_ce_run_changes_nothing(tmp_path):
    run = _run_folder(tmp_path / "run")
    before = _snapshot(run)
    with pytest.raises(UsageError, match="train-ce run"):
        supcon.run("pretrain", out=run, resume=True, progress=False)
    assert _snapshot(run) == before


def test_a_fifo_named_lock_neither_blocks_nor_is_replaced(tmp_path):
    import os

    from supcon.runs.lock import RunLock

    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / ".lock")
    with RunLock(out):  # would block forever writing the holder into a FIFO
        pass
    assert (out / ".lock").exists()  # not this process's file: left alone
    (out / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="not a supcon run folder"):
        check_run_dir(out, overwrite=True, resume=False)
