"""Repeats over seeds: the statistics against hand-computed numbers, the driver, a tiny real run."""

import json
import math

import pytest

import supcon
from supcon.cli import main
from supcon.core.errors import UsageError
from supcon.runs.seeds import (
    aggregate,
    fresh_seed_preset,
    mean_std,
    paired_difference,
    parse_seeds,
    report_text,
    run_seeds,
    seed_source,
    t_quantile,
)


def test_mean_and_sample_standard_deviation():
    mean, std = mean_std([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7)
    assert std == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2): n - 1 in the denominator
    assert mean_std([0.25]) == (0.25, None)
    with pytest.raises(ValueError):
        mean_std([])


def test_t_quantiles_match_the_table():
    # Two-sided 95%: the familiar t-table values for 1, 2, 4 and 29 degrees of freedom.
    for df, want in ((1, 12.706), (2, 4.303), (4, 2.776), (29, 2.045)):
        assert t_quantile(0.975, df) == pytest.approx(want, abs=1e-3)


def test_paired_difference_and_its_t_interval():
    p = paired_difference([0.80, 0.85, 0.90], [0.70, 0.80, 0.75])
    assert p["diffs"] == pytest.approx([0.10, 0.05, 0.15])
    assert p["mean"] == pytest.approx(0.10) and p["std"] == pytest.approx(0.05)
    half = 4.302653 * 0.05 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n) = 0.124207
    assert p["ci"] == pytest.approx([0.10 - half, 0.10 + half], abs=1e-6)
    assert p["n"] == 3 and p["level"] == 0.95
    assert paired_difference([0.9], [0.8])["ci"] is None
    with pytest.raises(ValueError):
        paired_difference([0.9, 0.8], [0.8])


def _results(ce, sup, joint=None):
    rows = [
        {"experiment": "cross-entropy", "test_acc": ce},
        {"experiment": "SupCon + frozen classifier", "test_acc": sup},
    ]
    if joint is not None:
        rows.append({"experiment": "SupCon+CE joint classifier", "test_acc": joint})
    return {"rows": rows}


def test_aggregate_gives_per_experiment_mean_std_and_paired_differences_for_compare():
    per_seed = {2: _results(0.75, 0.90, 0.8), 0: _results(0.70, 0.80, 0.6), 1: _results(0.80, 0.85, 0.7)}
    agg = aggregate("compare", per_seed)
    assert agg["seeds"] == [0, 1, 2] and agg["runs"] == {"0": "seed-0", "1": "seed-1", "2": "seed-2"}
    rows = {r["experiment"]: r for r in agg["rows"]}
    assert [r["experiment"] for r in agg["rows"]] == [
        "cross-entropy",
        "SupCon + frozen classifier",
        "SupCon+CE joint classifier",
    ]
    assert rows["cross-entropy"]["test_acc"] == pytest.approx(0.75)
    assert rows["cross-entropy"]["test_acc_std"] == pytest.approx(0.05)
    assert rows["cross-entropy"]["per_seed"] == [0.70, 0.80, 0.75]  # in seed order
    assert rows["SupCon+CE joint classifier"]["test_acc_std"] == pytest.approx(0.1)
    sup = next(p for p in agg["paired"] if p["a"] == "SupCon + frozen classifier")
    assert sup["b"] == "cross-entropy"
    assert sup["diffs"] == pytest.approx([0.10, 0.05, 0.15])  # paired by seed, not sorted
    assert sup["mean"] == pytest.approx(0.10) and sup["std"] == pytest.approx(0.05)
    assert len(agg["paired"]) == 2
    text = report_text(agg)
    assert "| cross-entropy | accuracy | 75.00 ± 5.00 | 70.00, 80.00, 75.00 |" in text
    assert "95% CI [-2.42, 22.42] (Student t, 2 degrees of freedom)" in text
    assert (
        aggregate("train-ce", {0: {"rows": [{"experiment": "cross-entropy", "test_acc": 0.5}]}})["paired"]
        == []
    )
    with pytest.raises(UsageError, match="seed 1 reports"):
        aggregate("compare", {0: _results(0.7, 0.8), 1: _results(0.7, 0.8, 0.9)})


def _lt_row(name, acc, many, medium, few):
    return {
        "experiment": name,
        "test_acc": acc,
        "group_acc": {"overall": acc, "many": many, "medium": medium, "few": few},
    }


def test_aggregate_carries_long_tail_groups_and_multilabel_map_over_seeds():
    per_seed = {
        0: {
            "rows": [
                _lt_row("cross-entropy", 0.60, 0.90, 0.50, 0.10),
                _lt_row("BCL classifier", 0.62, 0.80, 0.60, 0.30),
            ]
        },
        1: {
            "rows": [
                _lt_row("cross-entropy", 0.64, 0.94, 0.54, 0.20),
                _lt_row("BCL classifier", 0.66, 0.84, 0.62, 0.40),
            ]
        },
    }
    agg = aggregate("compare", per_seed)
    bcl = agg["rows"][1]
    assert bcl["metric"] == "test_acc" and bcl["test_acc"] == pytest.approx(0.64)
    assert bcl["metrics"]["few_acc"]["per_seed"] == [0.30, 0.40]
    assert bcl["metrics"]["few_acc"]["mean"] == pytest.approx(0.35)
    assert bcl["metrics"]["few_acc"]["std"] == pytest.approx(0.05 * math.sqrt(2))
    assert "overall_acc" not in bcl["metrics"]  # the headline already is the overall accuracy
    text = report_text(agg)
    assert "| experiment | metric | mean ± std | per seed | many | medium | few |" in text
    assert (
        "| BCL classifier | accuracy | 64.00 ± 2.83 | 62.00, 66.00 "
        "| 82.00 ± 2.83 | 61.00 ± 1.41 | 35.00 ± 7.07 |" in text
    )

    # Multi-label rows have no accuracy: mAP is their headline, F1 their secondary numbers.
    def ml(m, f1):
        return {
            "rows": [
                {"experiment": "cross-entropy", "map": m, "micro_f1": f1, "macro_f1": f1 / 2},
                {"experiment": "SupCon + frozen classifier", "map": m + 0.1, "micro_f1": f1, "macro_f1": f1},
            ]
        }

    agg = aggregate("compare", {0: ml(0.5, 0.6), 1: ml(0.6, 0.7)})
    ce, sup = agg["rows"]
    assert ce["metric"] == "map" and ce["map"] == pytest.approx(0.55) and "test_acc" not in ce
    assert ce["metrics"]["macro_f1"]["mean"] == pytest.approx(0.325)
    assert agg["paired"][0]["metric"] == "map" and agg["paired"][0]["diffs"] == pytest.approx([0.1, 0.1])
    text = report_text(agg)
    assert "| cross-entropy | mAP | 55.00 ± 7.07 | 50.00, 60.00 | 65.00 ± 7.07 | 32.50 ± 3.54 |" in text
    assert "Paired difference of mAP, SupCon + frozen classifier − cross-entropy" in text
    with pytest.raises(UsageError, match="no test accuracy or mAP"):
        aggregate("compare", {0: {"rows": [{"experiment": "cross-entropy", "test_acc": None}]}})


def test_run_seeds_runs_each_seed_in_its_folder_and_resumes_only_what_is_unfinished(tmp_path):
    calls = []

    def one(seed, folder, resume):
        calls.append((seed, folder.name, resume))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(f"seed: {seed}\n")
        return _results(0.7 + seed / 100, 0.8)

    agg = run_seeds("compare", [0, 1], tmp_path / "out", one)
    assert calls == [(0, "seed-0", False), (1, "seed-1", False)]
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == agg
    assert "Paired difference" in (tmp_path / "out" / "report.md").read_text()
    # seed 0 finished (results.json), seed 1 started (config.yaml only), seed 2 never ran
    (tmp_path / "out" / "seed-0" / "results.json").write_text(json.dumps(_results(0.5, 0.6)))
    calls.clear()
    agg = run_seeds("compare", [0, 1, 2], tmp_path / "out", one, resume=True)
    assert calls == [(1, "seed-1", True), (2, "seed-2", False)]
    assert agg["rows"][0]["per_seed"] == pytest.approx([0.5, 0.71, 0.72])
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "config.yaml").write_text("{}")
    with pytest.raises(UsageError, match="single run"):
        run_seeds("compare", [0], tmp_path / "single", one)


def test_seed_lists_and_sources(tmp_path, capsys):
    assert parse_seeds("0,1, 2") == [0, 1, 2]
    for bad in ("0,0", "a,1", "-1", ""):
        with pytest.raises(UsageError):
            parse_seeds(bad)
    with pytest.raises(SystemExit) as e:
        main(["compare", "--seeds", "1,1"])
    assert e.value.code == 2 and "distinct" in capsys.readouterr().err
    (tmp_path / "pre" / "seed-3").mkdir(parents=True)
    (tmp_path / "pre" / "seed-3" / "config.yaml").write_text("{}")
    assert seed_source(tmp_path / "pre", 3) == tmp_path / "pre" / "seed-3"  # a folder of seeds
    assert seed_source(tmp_path / "pre" / "seed-3", 5) == tmp_path / "pre" / "seed-3"  # one run
    assert seed_source(None, 0) is None
    # a seed that starts on --resume takes a started seed's saved config, unless a preset is given
    assert fresh_seed_preset("compare", tmp_path / "pre", None) == str(tmp_path / "pre/seed-3/config.yaml")
    assert fresh_seed_preset("compare", tmp_path / "pre", "cpu-fast") == "cpu-fast"
    assert fresh_seed_preset("linear", tmp_path / "pre", None) is None  # linear: from --from
    assert fresh_seed_preset("compare", tmp_path / "none", None) is None


TINY = {"data.dataset": "digits", "precision": "fp32", "tune_cpu": False, "model.feature_dim": 32,
        "ce.epochs": 1, "pretrain.epochs": 1, "linear.epochs": 1, "ce.batch_size": 256,
        "pretrain.batch_size": 256, "linear.batch_size": 256}  # fmt: skip


@pytest.mark.slow
def test_compare_over_two_seeds_writes_seed_folders_and_the_aggregate(tmp_path):
    out = tmp_path / "rep"
    agg = supcon.run(
        "compare", out=out, overrides=TINY | {"loss.method": "supcon+ce"}, progress=False, seeds=[0, 1]
    )
    per = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert all((out / f"seed-{s}" / "weights" / "joint.safetensors").is_file() for s in (0, 1))
    names = [r["experiment"] for r in per[0]["rows"]]
    assert names == ["cross-entropy", "SupCon+CE + frozen classifier", "SupCon+CE joint classifier"]
    for i, name in enumerate(names):
        accs = [p["rows"][i]["test_acc"] for p in per]
        row = agg["rows"][i]
        assert row["experiment"] == name and row["per_seed"] == accs
        assert row["test_acc"] == pytest.approx(sum(accs) / 2)
        assert row["test_acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
    assert json.loads((out / "results.json").read_text()) == agg
    assert (
        "Paired difference of accuracy, SupCon+CE + frozen classifier − cross-entropy"
        in (out / "report.md").read_text()
    )
    assert per[0]["rows"][0]["test_acc"] != per[1]["rows"][0]["test_acc"]  # the seeds differ
    # resuming the finished repeat reads the seeds back instead of training again
    again = supcon.run("compare", out=out, progress=False, seeds=[0, 1], resume=True)
    assert again == agg


@pytest.mark.slow
def test_cli_seeds_stop_and_resume_continue_every_seed(tmp_path, capsys):
    out = tmp_path / "ce"
    args = ["train-ce", "--dataset", "digits", "--epochs", "2", "--batch-size", "256", "--precision", "fp32",
            "--quiet", "--seeds", "0,1", "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main([*args, "--stop-after", "1"])
    assert e.value.code == 0
    err = capsys.readouterr().err
    assert f"supcon train-ce --seeds 0,1 --resume --out {out}" in err  # continues the whole repeat
    assert (out / "seed-0" / "checkpoints").is_dir() and not (out / "seed-1").exists()
    with pytest.raises(SystemExit) as e:
        main(["train-ce", "--seeds", "0,1", "--resume", "--out", str(out), "--quiet"])
    assert e.value.code == 0
    assert "over seeds [0, 1]: mean ± std" in capsys.readouterr().out
    agg = json.loads((out / "results.json").read_text())
    assert agg["seeds"] == [0, 1] and agg["rows"][0]["experiment"] == "cross-entropy"
    for s in (0, 1):
        run = json.loads((out / f"seed-{s}" / "results.json").read_text())
        assert agg["rows"][0]["per_seed"][s] == run["rows"][0]["test_acc"]
        lines = (out / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2  # seed 0 resumed after its first epoch, seed 1 ran whole
        assert f"seed: {s}" in (out / f"seed-{s}" / "config.yaml").read_text()
