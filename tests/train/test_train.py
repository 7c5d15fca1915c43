"""Checkpoints and resume: an interrupted run ends exactly where an uninterrupted one does."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from supcon.cli import main

pytestmark = pytest.mark.slow

BASE = ["--dataset", "digits", "--batch-size", "128", "--precision", "fp32", "--quiet", "--seed", "3"]


def cli(args):
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


def assert_same_weights(a, b):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] == wb[k]).all(), k  # bit-identical on the CPU


def test_stop_after_then_resume_is_bit_identical(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli(["pretrain", *BASE, "--epochs", "3", "--out", str(straight)]) == 0
    assert cli(["pretrain", *BASE, "--epochs", "3", "--out", str(resumed), "--stop-after", "1"]) == 0
    assert "continue with" in capsys.readouterr().err
    assert not (resumed / "weights" / "pretrain.safetensors").exists()
    assert cli(["pretrain", *BASE, "--epochs", "3", "--out", str(resumed), "--resume"]) == 0
    assert_same_weights(straight / "weights/pretrain.safetensors", resumed / "weights/pretrain.safetensors")
    epochs = [line for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 3


def test_sigterm_mid_run_saves_and_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [
        "train-ce",
        "--dataset",
        "digits",
        "--batch-size",
        "32",
        "--precision",
        "fp32",
        "--seed",
        "5",
        "--epochs",
        "3",
    ]
    assert cli([*args, "--quiet", "--out", str(straight)]) == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "supcon", *args, "--out", str(resumed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    for line in p.stdout:  # wait until training is under way, then stop it
        if "ce epoch 1/3" in line:
            p.send_signal(signal.SIGTERM)
            break
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "progress saved" in err
    assert not (resumed / "weights" / "ce.safetensors").exists()
    assert cli([*args, "--quiet", "--out", str(resumed), "--resume"]) == 0
    assert_same_weights(straight / "weights/ce.safetensors", resumed / "weights/ce.safetensors")


def test_resume_refuses_changed_config_and_bad_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["pretrain", *BASE, "--epochs", "2", "--out", str(run), "--stop-after", "1"]) == 0
    capsys.readouterr()
    assert cli(["pretrain", *BASE, "--epochs", "2", "--out", str(run), "--resume", "--lr", "0.01"]) == 2
    assert "pretrain.lr" in capsys.readouterr().err
    ckpt = next((run / "checkpoints").glob("pretrain-e*.pt"))
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated
    assert cli(["pretrain", *BASE, "--epochs", "2", "--out", str(run), "--resume"]) == 2
    assert "unreadable" in capsys.readouterr().err
    ckpt.unlink()
    assert cli(["pretrain", *BASE, "--epochs", "2", "--out", str(run), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


class _WritesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_resume_from_a_prepared_checkpoint_refuses_it_and_runs_no_code(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    assert cli(["pretrain", *BASE, "--epochs", "2", "--out", str(run), "--stop-after", "1"]) == 0
    ckpt = next((run / "checkpoints").glob("pretrain-e*.pt"))
    state = torch.load(ckpt, weights_only=True)
    state["history"].append(_WritesFile(marker))  # the rest of the checkpoint is genuine
    torch.save(state, ckpt)
    capsys.readouterr()
    assert cli(["pretrain", *BASE, "--epochs", "2", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "refusing to load" in err and len(err.splitlines()) == 1
    assert not marker.exists()


def test_compare_resume_skips_finished_phases(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["compare", *BASE, "--epochs", "2", "--out", str(run)]
    assert cli([*args, "--stop-after", "1"]) == 0  # stops the first phase (ce) after epoch 1
    assert cli([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "SupCon + frozen classifier" in out
    phases = [
        line.split('"phase": "')[1].split('"')[0] for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert phases == ["ce", "ce", "pretrain", "pretrain", "linear", "linear"]


def test_linear_finetune_trains_the_encoder_and_keeps_the_pretrained_one(tmp_path, capsys):
    pre, probe, tuned = tmp_path / "pre", tmp_path / "probe", tmp_path / "tuned"
    assert cli(["pretrain", *BASE, "--epochs", "1", "--out", str(pre)]) == 0
    assert cli(["linear", "--from", str(pre), "--quiet", "--epochs", "2", "--out", str(probe)]) == 0
    assert (
        cli(["linear", "--from", str(pre), "--quiet", "--epochs", "2", "--finetune", "--out", str(tuned)])
        == 0
    )
    assert "fine-tuned encoder + classifier" in capsys.readouterr().out
    pretrained = load_file(str(pre / "weights/pretrain.safetensors"))
    probed = load_file(str(probe / "weights/linear.safetensors"))
    whole = load_file(str(tuned / "weights/linear.safetensors"))
    enc_keys = {k for k in pretrained if k.startswith("encoder.")}
    assert enc_keys <= probed.keys() and enc_keys <= whole.keys()  # classifier files are self-contained
    # the probe kept the pre-trained encoder; fine-tuning moved it
    assert all(torch.equal(probed[k], pretrained[k]) for k in enc_keys)
    assert max((whole[k] - pretrained[k]).abs().max().item() for k in enc_keys) > 1e-3
    # eval loads the fine-tuned classifier and gives the accuracy the run reported
    import json

    from supcon.experiments import evaluate_folder

    for run, name in ((tuned, "fine-tuned"), (probe, "frozen")):
        rows = {r["experiment"]: r["test_acc"] for r in evaluate_folder(run, retrieval=False)["rows"]}
        reported = json.loads((run / "results.json").read_text())["rows"][0]["test_acc"]
        assert rows[f"{name} encoder + classifier"] == pytest.approx(reported)


def test_finetune_is_refused_outside_the_linear_phase(capsys):
    assert cli(["pretrain", *BASE, "--set", "pretrain.finetune=true"]) == 2
    assert "only the linear phase fine-tunes" in capsys.readouterr().err
