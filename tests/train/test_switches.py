"""The paper's pipeline on a tiny ResNet, and the speed switches: each runs and gives a finite loss."""

import json

import pytest

from supcon.cli import main

pytestmark = pytest.mark.slow

PAPER_TINY = [
    "pretrain",
    "--preset",
    "paper-cifar10",
    "--dataset",
    "digits",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--quiet",
    "--set",
    "model.width=8",
    "--set",
    "model.blocks=[1,1,1,1]",
    "--set",
    "model.projection_dim=16",
    "--set",
    "pretrain.warmup_epochs=0.5",
    "--set",
    "knn_k=5",
]


def run(tmp_path, *extra):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main([*PAPER_TINY, "--out", str(out), *extra])
    assert e.value.code == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["loss"] == r["loss"] and r["loss"] < 1e6 for r in rows)  # finite
    return out


def test_paper_pipeline_with_augmented_views(tmp_path):
    out = run(tmp_path, "--set", "data.val_fraction=0.1", "--set", "knn_every=1")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "val_knn_acc" in rows[-1]
    pre = [r for r in rows if r["phase"] == "pretrain"]
    assert pre and all(-1 <= r["neg_cos"] <= 1 for r in pre)  # the collapse sign, every epoch
    assert (out / "views.png").is_file() and "views.png" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "switch",
    [
        ["--precision", "fp32"],
        ["--precision", "bf16"],
        ["--set", "channels_last=false"],
        ["--method", "simclr"],
        ["--set", "pretrain.optimizer=lars"],
        ["--set", "loss.chunk_size=32"],
    ],
)
def test_switches_run_finite(tmp_path, switch):
    run(tmp_path, *switch)


def test_torch_compile_runs_finite(tmp_path):
    pytest.importorskip("torch._inductor")
    run(tmp_path, "--set", "compile=true", "--precision", "fp32")
