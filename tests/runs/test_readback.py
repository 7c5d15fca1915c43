"""metrics.jsonl and a finished seed's results.json are checked when read back."""

import json

import pytest

from supcon.core.errors import UsageError
from supcon.core.runlog import RunLog, read_metrics
from supcon.runs.seeds import run_seeds


def test_a_killed_append_is_skipped_other_damage_is_named(tmp_path):
    good = json.dumps({"phase": "ce", "epoch": 1, "loss": 1.0})
    (tmp_path / "metrics.jsonl").write_text(good + '\n{"phase": "ce", "epo')
    assert read_metrics(tmp_path) == [json.loads(good)]
    RunLog(tmp_path).truncate("ce", 1)  # a resume after the kill rewrites the log whole
    assert read_metrics(tmp_path) == [json.loads(good)]
    for bad in ("[1]", '{"phase": 3, "epoch": 1}', '{"phase": "ce", "epoch": "1"}', "[" * 10_000, "nonsense"):
        (tmp_path / "metrics.jsonl").write_text(f"{bad}\n{good}\n")
        with pytest.raises(UsageError, match="metrics.jsonl line 1") as e:
            read_metrics(tmp_path)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "results",
    ["[]", '{"rows": 3}', '{"rows": [{"test_acc": 0.5}]}',
     '{"rows": [{"experiment": "x", "test_acc": "high"}]}',
     '{"rows": [{"experiment": "x", "test_acc": 0.5, "group_acc": [1]}]}', "\x00"],
)  # fmt: skip
def test_a_damaged_finished_seed_is_one_line(tmp_path, results):
    folder = tmp_path / "out" / "seed-0"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(results)
    with pytest.raises(UsageError, match="results.json"):
        run_seeds("compare", [0], tmp_path / "out", lambda *a: {}, resume=True)
