"""The command line end to end on tiny runs (digits, 1-2 epochs), and its bad-input contract."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from supcon.cli import main

TINY = ["--dataset", "digits", "--epochs", "2", "--batch-size", "128", "--quiet"]


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.slow
def test_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["compare", *TINY, "--out", str(out)], capsys)
    assert code == 0, err
    assert "cross-entropy" in stdout and "SupCon + frozen classifier" in stdout
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "results.json",
        "report.md",
        "curves.png",
        "tsne.png",
        "weights/ce.safetensors",
        "weights/pretrain.safetensors",
        "weights/linear.safetensors",
    ):
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["phase"], m["epoch"]) for m in lines] == [
        ("ce", 1),
        ("ce", 2),
        ("pretrain", 1),
        ("pretrain", 2),
        ("linear", 1),
        ("linear", 2),
    ]
    results = json.loads((out / "results.json").read_text())
    # 10 classes: even two epochs of training beat chance clearly
    assert all(r["test_acc"] > 0.3 for r in results["rows"]), results["rows"]
    # the weights load with weights_only semantics (safetensors) and eval reproduces the accuracy
    code, stdout, err = run_cli(["eval", "--from", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    ce_acc = float(stdout.split("cross-entropy: ")[1].split("%")[0])
    assert abs(ce_acc - 100 * results["rows"][0]["test_acc"]) < 0.006  # printed with 2 decimals


def test_existing_run_folder_is_refused_then_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(["train-ce", *TINY, "--out", str(out)], capsys)
    assert code == 2 and "not empty" in err and "Traceback" not in err
    code, _, err = run_cli(["train-ce", *TINY, "--out", str(out), "--overwrite"], capsys)
    assert code == 2 and "not a supcon run folder" in err
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "--data", "/no/such/dir"], "does not exist"),
        (["compare", "--dataset", "nope"], "unknown dataset 'nope'"),
        (["compare", "--preset", "nope"], "unknown preset 'nope'"),
        (["compare", "--epochs", "0"], "must be positive"),
        (["compare", "--batch-size", "-3"], "must be positive"),
        (["compare", "--encoder", "vgg"], "unknown encoder 'vgg'"),
        (["compare", "--set", "ce.optimizer=adagrad"], "unknown optimizer 'adagrad'"),
        (["compare", "--set", "pretrain.nope=1"], "pretrain.nope"),
        (["eval", "--from", "/no/such/run"], "does not exist"),
        (["compare", "--resume"], "--resume needs --out"),
        (["train-ce", "--temperature", "9"], "unrecognized arguments: --temperature"),
        (["train-ce", "--method", "simclr"], "unrecognized arguments: --method"),
        (["linear", "--temperature", "0.5"], "unrecognized arguments: --temperature"),
        (["compare", "--dataset", "cifar10", "--image-size", "64"], "data.image_size (--image-size)"),
    ],
)
def test_bad_input_one_line_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli([*args, "--quiet"] if args[0] != "eval" else args, capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_train_ce_is_not_refused_for_a_rule_of_pre_training(tmp_path, capsys):
    # SimCLR with one view cannot pre-train, but train-ce runs no pre-training.
    sets = ["--set", "loss.method=simclr", "--set", "pretrain.views=1", "--epochs", "1"]
    code, _, err = run_cli(["train-ce", *TINY, *sets, "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["pretrain", *TINY, *sets, "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "pretrain with views=1" in err


def test_python_dash_m_entry_point_and_help():
    r = subprocess.run([sys.executable, "-m", "supcon", "compare", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in (
        "--preset",
        "--dataset",
        "--data",
        "--epochs",
        "--batch-size",
        "--seed",
        "--out",
        "--overwrite",
    ):
        assert flag in r.stdout


def test_readme_commands_exist():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_a_failed_start_does_not_block_the_corrected_rerun(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["train-ce", "--data", str(tmp_path / "missing"), "--quiet", "--out", str(out)], capsys
    )
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(["train-ce", *TINY, "--epochs", "1", "--out", str(out)], capsys)
    assert code == 0, err


def test_out_below_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(["train-ce", *TINY, "--out", str(tmp_path / "file" / "run")], capsys)
    assert code == 2 and "file" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_divergence_stops_with_one_line_and_a_report(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train-ce", *TINY, "--epochs", "3", "--lr", "1e30", "--precision", "fp32", "--out", str(out)]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "diverged" in err and "epoch 1" in err and "lower the learning rate" in err
    report = (out / "report.md").read_text()
    assert "diverged" in report
    lines = (
        [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        if (out / "metrics.jsonl").is_file()
        else []
    )
    assert all(x["loss"] == x["loss"] for x in lines)  # no NaN epoch was logged


@pytest.mark.slow
def test_the_printed_resume_command_works_also_with_the_original_preset(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train-ce", "--preset", "keras-example", *TINY, "--epochs", "2", "--out", str(out)]
    code, _, err = run_cli([*args, "--stop-after", "1"], capsys)
    assert code == 0
    printed = err.split("continue with: ")[1].strip().split()
    assert printed[:2] == ["supcon", "train-ce"]
    code, _, err = run_cli(printed[1:], capsys)  # the printed command, as it is
    assert code == 0, err
    code, _, err = run_cli([*args[:-2], "--out", str(tmp_path / "again"), "--stop-after", "1"], capsys)
    code, _, err = run_cli([*args[:-2], "--out", str(tmp_path / "again"), "--resume"], capsys)
    assert code == 0, err  # the same command plus --resume, preset included


@pytest.mark.slow
def test_a_second_writer_is_refused_while_a_run_holds_its_folder(tmp_path, capsys):
    import os
    import signal

    out = tmp_path / "run"
    args = ["train-ce", "--dataset", "digits", "--epochs", "50", "--batch-size", "32", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "supcon", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for line in first.stdout:  # the first run is training
            if "ce epoch 1/50" in line:
                break
        for extra in ([], ["--overwrite"], ["--resume"]):
            code, _, err = run_cli([*args, "--quiet", *extra], capsys)
            assert code == 2 and f"is in use by pid {first.pid}" in err, (extra, err)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0
    code, _, err = run_cli([*args[:4], "2", *args[5:], "--quiet", "--resume"], capsys)
    assert code == 2 and "config differs" in err  # the lock is gone with its process; the config check speaks
