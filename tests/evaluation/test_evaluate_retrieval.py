"""Retrieval in runs: the open-set split (data.exclude_classes), TensorBoard scalars, and the
retrieval blocks of results.json, report.md and `supcon eval`."""

import json
import sys

import pytest
import torch

from supcon.core.config import Config, set_values, validate
from supcon.core.errors import UsageError
from supcon.core.runlog import RunLog
from supcon.data.dataset import ImageDataset
from supcon.data.datasets import exclude_classes


def tiny_dataset(paths: bool = True) -> ImageDataset:
    train_y, test_y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 2]), torch.tensor([3, 2, 1, 0, 2])
    return ImageDataset(
        "tiny",
        torch.arange(9, dtype=torch.uint8).view(9, 1, 1, 1).expand(9, 2, 2, 3).contiguous(),
        train_y,
        torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 2, 2, 3).contiguous(),
        test_y,
        ["cat", "dog", "7", "emu"],
        train_paths=[f"tr{i}" for i in range(9)] if paths else None,
        test_paths=[f"te{i}" for i in range(5)] if paths else None,
    )


def test_excluded_classes_move_to_held_out_by_name_or_id():
    data = exclude_classes(tiny_dataset(), ["dog", 2])  # "dog" by name, 2 by id (its name is "7")
    assert data.train_y.tolist() == [0, 3, 0, 3] and data.train_x[:, 0, 0, 0].tolist() == [0, 3, 4, 7]
    assert data.test_y.tolist() == [3, 0] and data.test_paths == ["te0", "te3"]
    held = data.held_out
    assert held.train_y.tolist() == [1, 2, 1, 2, 2] and held.train_paths == [
        "tr1",
        "tr2",
        "tr5",
        "tr6",
        "tr8",
    ]
    assert held.test_y.tolist() == [2, 1, 2] and held.test_x[:, 0, 0, 0].tolist() == [1, 2, 4]
    assert data.classes == held.classes == ["cat", "dog", "7", "emu"]  # label ids keep their meaning
    assert held.held_out is None
    # a name wins over an id: "7" is class 2, not class 7 (there is none)
    assert exclude_classes(tiny_dataset(False), ["7"]).held_out.train_y.unique().tolist() == [2]
    same = tiny_dataset()
    assert exclude_classes(same, None) is same and exclude_classes(same, []) is same


def test_bad_exclusions_are_refused_with_the_valid_names():
    with pytest.raises(UsageError, match=r"unknown \['cow', 9\]; the classes are: cat, dog, 7, emu"):
        exclude_classes(tiny_dataset(), ["cat", "cow", 9])
    with pytest.raises(UsageError, match="leaves 1 class"):
        exclude_classes(tiny_dataset(), ["cat", "dog", "emu"])


def test_config_keys_and_the_tensorboard_flag():
    cfg = Config()
    assert cfg.data.exclude_classes is None and cfg.tensorboard is False
    set_values(cfg, {"data.exclude_classes": [8, "nine"], "tensorboard": True})
    validate(cfg)
    with pytest.raises(UsageError, match="exclude_classes"):
        set_values(cfg, {"data.exclude_classes": "cat"})
    with pytest.raises(UsageError, match="tensorboard"):
        set_values(cfg, {"tensorboard": "yes"})
    from supcon.cli import build_parser, flag_overrides

    args = build_parser().parse_args(["train-ce", "--tensorboard"])
    assert flag_overrides(args)["tensorboard"] is True
    assert "tensorboard" not in flag_overrides(build_parser().parse_args(["train-ce"]))


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_run_log_writes_every_number_as_a_tensorboard_scalar(tmp_path):
    pytest.importorskip("tensorboard")
    log = RunLog(tmp_path, tensorboard=True)
    log.append({"phase": "ce", "epoch": 1, "loss": 2.5, "train_acc": 0.25, "lr": 0.1, "seconds": 3.0})
    log.append({"phase": "ce", "epoch": 2, "loss": 1.5, "train_acc": 0.5, "lr": 0.05, "seconds": 2.0})
    log.append({"phase": "linear", "epoch": 1, "loss": 0.5, "val_acc": 0.75, "seconds": 1.0, "note": "x"})
    log.close()
    got = scalars(tmp_path / "tensorboard")
    assert got["ce/loss"] == [(1, 2.5), (2, 1.5)] and got["ce/lr"] == [
        (1, pytest.approx(0.1)),
        (2, pytest.approx(0.05)),
    ]
    assert got["linear/val_acc"] == [(1, 0.75)] and "linear/note" not in got
    assert set(got) == {"ce/loss", "ce/train_acc", "ce/lr", "ce/seconds", "linear/loss", "linear/val_acc",
                        "linear/seconds"}  # fmt: skip
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    plain = RunLog(tmp_path / "p")
    (tmp_path / "p").mkdir()
    plain.append({"phase": "ce", "epoch": 1, "loss": 1.0})
    assert not (tmp_path / "p" / "tensorboard").exists()


def test_missing_tensorboard_names_the_extra(monkeypatch, tmp_path):
    from supcon.runs.open import open_run

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = Config()
    cfg.tensorboard = True
    with pytest.raises(UsageError, match=r"pip install 'supcon\[tensorboard\]'"):
        open_run(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the folder was written


SEEN = ["0", "1", "2", "3"]
HELD = ["4", "5", "6", "7", "8", "9"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny compare run on digits: 6 of the 10 classes held out, TensorBoard on."""
    import supcon

    out = tmp_path_factory.mktemp("retr") / "run"
    overrides = {"data.dataset": "digits", "ce.epochs": 1, "pretrain.epochs": 1, "linear.epochs": 2,
                 "precision": "fp32", "data.exclude_classes": [int(c) for c in HELD[:3]] + HELD[3:],
                 "tensorboard": True}  # fmt: skip
    results = supcon.run("compare", out=out, overrides=overrides, progress=False)
    return out, results


@pytest.mark.slow
def test_results_and_report_hold_both_retrieval_blocks(run):
    out, results = run
    saved = json.loads((out / "results.json").read_text())
    for block in (saved["retrieval"], saved["retrieval_open_set"]):
        assert set(block["encoders"]) == {"cross-entropy encoder", "SupCon encoder"}
        for metrics in block["encoders"].values():
            assert set(metrics) == {"precision@1", "r_precision", "map@r", "recall@1", "recall@5",
                                    "recall@10", "knn@20", "knn@200"}  # fmt: skip
            assert all(0 <= v <= 1 for v in metrics.values())
            assert metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"]
            # every query has relevant items here, so precision@1 is recall@1
            assert metrics["precision@1"] == pytest.approx(metrics["recall@1"])
    assert saved["retrieval_open_set"]["classes"] == HELD
    from supcon.data.datasets import load_dataset

    full = load_dataset("digits")
    n_seen_test = int(torch.isin(full.test_y, torch.arange(4)).sum())
    assert saved["retrieval"]["queries"] == f"the {n_seen_test} test images"
    assert saved["retrieval_open_set"]["queries"] == f"the {len(full.test_y) - n_seen_test} test images"
    report = (out / "report.md").read_text()
    assert "## Retrieval (test images against the training set)" in report
    assert "## Open-set retrieval (classes never trained on: 4, 5, 6, 7, 8, 9)" in report
    assert "| SupCon encoder" in report
    for png in ("retrieval.png", "confusion-ce.png", "confusion-linear.png", "tsne.png"):
        assert (out / png).is_file() and f"({png})" in report, png
    assert saved["retrieval"] == results["retrieval"]


@pytest.mark.slow
def test_no_phase_saw_a_held_out_class_and_eval_reproduces_the_blocks(run):
    out, results = run
    from supcon.data.datasets import load_split
    from supcon.experiments import evaluate_folder
    from supcon.runs.folder import read_config

    cfg = read_config(out)
    data, split = load_split(cfg.data, cfg.seed, progress=False)
    assert set(split.train_y.unique().tolist()) == {0, 1, 2, 3}
    assert set(data.test_y.unique().tolist()) == {0, 1, 2, 3}
    assert set(data.held_out.train_y.unique().tolist()) == set(range(4, 10))
    evaluated = evaluate_folder(out, device="cpu")
    for key in ("retrieval", "retrieval_open_set"):
        for name, metrics in results[key]["encoders"].items():
            assert evaluated[key]["encoders"][name] == pytest.approx(metrics, abs=1e-9), (key, name)
    rows = {r["experiment"]: r["test_acc"] for r in evaluated["rows"]}
    assert rows["cross-entropy"] == pytest.approx(results["rows"][0]["test_acc"])
    assert evaluate_folder(out, device="cpu", retrieval=False)["rows"] == evaluated["rows"]


@pytest.mark.slow
def test_tensorboard_has_the_epoch_records(run):
    out, _ = run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    got = scalars(out / "tensorboard")
    for r in records:
        for key, value in r.items():
            if key not in ("phase", "epoch"):
                assert (r["epoch"], pytest.approx(value, rel=1e-6)) in got[f"{r['phase']}/{key}"], key
    assert [s for s, _ in got["linear/loss"]] == [1, 2]
