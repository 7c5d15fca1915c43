"""torchrun with 2 CPU processes (gloo) trains exactly as one process on the whole batch."""

import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from supcon.core.dist import local_command

pytestmark = pytest.mark.slow

COMMON = ["--dataset", "digits", "--epochs", "2", "--precision", "fp32", "--quiet"]
ARGS = [
    "pretrain",
    *COMMON,
    "--batch-size",
    "128",
    "--seed",
    "1",
    "--set",
    "loss.variant=out",
    "--set",
    "model.projection=mlp",
    # SGD, not Adam: Adam's per-weight normalisation would hide a wrong gradient scale.
    "--set",
    "pretrain.optimizer=sgd",
    "--lr",
    "0.05",
    # At the preset's temperature 0.05 rounding differences (the order of a sum) grow step by step;
    # 0.5 keeps two epochs of one- and two-process training comparable at float tolerance.
    "--temperature",
    "0.5",
]


def _run(args, nproc, env):
    r = subprocess.run(local_command(args, nproc), capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def torchrun(args, nproc=2):
    # Strict collectives: every collective of the trainer is checked against NCCL's rules (tensors on
    # the compute device, the same shape on every rank), so a CPU run catches what GPUs would refuse.
    env = {"OMP_NUM_THREADS": "1", "SUPCON_DIST_TIMEOUT": "60", "SUPCON_STRICT_COLLECTIVES": "1"}
    return _run(args, nproc, {**os.environ, **env})


def single(args):
    return _run(args, 1, {**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    single([*ARGS, "--out", str(base / "one")])
    torchrun([*ARGS, "--out", str(base / "two")])
    return base


def test_two_ranks_train_like_one_rank_with_the_full_batch(runs):
    one = load_file(str(runs / "one/weights/pretrain.safetensors"))
    two = load_file(str(runs / "two/weights/pretrain.safetensors"))
    assert one.keys() == two.keys()
    moved = 0.0
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)
    init = torch.load(sorted((runs / "one/checkpoints").glob("pretrain-e*.pt"))[0], weights_only=False)
    moved = max((init["model"][k] - one[k]).abs().max().item() for k in one)
    assert moved > 1e-3  # training really changed the weights, so the comparison means something
    # the loss per epoch (the global loss, logged by rank 0) agrees too
    lines_one = (runs / "one/metrics.jsonl").read_text().splitlines()
    lines_two = (runs / "two/metrics.jsonl").read_text().splitlines()
    assert len(lines_one) == len(lines_two) == 2
    for a, b in zip(lines_one, lines_two, strict=True):
        la, lb = float(a.split('"loss": ')[1].split(",")[0]), float(b.split('"loss": ')[1].split(",")[0])
        assert abs(la - lb) < 1e-4 * abs(la)


CE_ARGS = [
    "train-ce",
    *COMMON,
    "--batch-size",
    "256",  # 1347 training images: the last batch (67) splits unevenly, 34 + 33
    "--seed",
    "2",
    "--set",
    "model.classifier=linear",  # no dropout: the same function on one or two processes
    "--set",
    "ce.optimizer=sgd",
    "--lr",
    "0.05",
]


def test_cross_entropy_two_ranks_train_like_one_rank(tmp_path):
    single([*CE_ARGS, "--out", str(tmp_path / "one")])
    torchrun([*CE_ARGS, "--out", str(tmp_path / "two")])
    one = load_file(str(tmp_path / "one/weights/ce.safetensors"))
    two = load_file(str(tmp_path / "two/weights/ce.safetensors"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)


def test_resume_under_two_ranks_continues_where_it_stopped(runs):
    out = runs / "resumed"
    r = torchrun([*ARGS, "--out", str(out), "--stop-after", "1"])
    assert "progress saved" in r.stderr
    torchrun([*ARGS, "--out", str(out), "--resume"])
    a = load_file(str(runs / "two/weights/pretrain.safetensors"))
    b = load_file(str(out / "weights/pretrain.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("command", ["pretrain", "train-ce"])
def test_a_rank_with_an_empty_share_of_the_last_batch(tmp_path, command):
    # 1347 training images in batches of 673: the last batch holds one image, so rank 1's share is
    # empty. Both ranks still step together (no hang), and end where one process does.
    args = [*(ARGS if command == "pretrain" else CE_ARGS), "--batch-size", "673", "--epochs", "1"]
    single([*args, "--out", str(tmp_path / "one")])
    torchrun([*args, "--out", str(tmp_path / "two")])
    phase = "pretrain" if command == "pretrain" else "ce"
    one = load_file(str(tmp_path / f"one/weights/{phase}.safetensors"))
    two = load_file(str(tmp_path / f"two/weights/{phase}.safetensors"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)
