"""After a mid-epoch resume, that epoch's metrics.jsonl record covers the whole epoch: the running sums
of the steps before the stop travel in the checkpoint."""

import json

import pytest

from supcon.commands import COMMANDS
from supcon.core.config import load_preset, set_values
from supcon.core.stop import Interrupted
from supcon.runs.open import open_run
from supcon.train import loop

TINY = {"data.dataset": "digits", "ce.epochs": 2, "ce.batch_size": 64, "precision": "fp32", "seed": 3}


def _train(out, resume=False):
    cfg = load_preset("keras-example")
    set_values(cfg, TINY)
    run = open_run(cfg, out, resume=resume, progress=False, phases=("ce",), command="train-ce")
    try:
        with run.stop:
            return COMMANDS["train-ce"].function()(run, None)
    finally:
        run.close()


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stop_at", [0, 4, 13])
def test_a_resumed_epoch_record_matches_the_uninterrupted_one(tmp_path, monkeypatch, stop_at):
    monkeypatch.setattr("supcon.evaluation.retrieval_report.plot_tsne", lambda maps, y, c, path, seed: path)
    _train(tmp_path / "a")
    straight = _records(tmp_path / "a")
    real = loop._stop_now
    monkeypatch.setattr(loop, "_stop_now", lambda run, s, steps: s == stop_at or real(run, s, steps))
    with pytest.raises(Interrupted):
        _train(tmp_path / "b")
    monkeypatch.setattr(loop, "_stop_now", real)
    _train(tmp_path / "b", resume=True)
    resumed = _records(tmp_path / "b")
    assert len(resumed) == len(straight) == 2
    for a, b in zip(straight, resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["train_acc"] == pytest.approx(a["train_acc"], abs=1e-6)
