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


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda c: c["model"].pop(next(iter(c["model"]))), "does not fit this run"),
        (lambda c: c.update(streams=[1, 2]), "does not fit this run"),
        (lambda c: c.update(optimizer={"state": 3}), "does not fit this run"),
        (lambda c: c.update(epoch="1"), "epoch must be an integer"),
        (lambda c: c.update(partial={"loss": float("nan")}), "partial.loss must be a finite number"),
        (lambda c: c.pop("history"), "history is missing"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_on_resume(tmp_path, monkeypatch, damage, match):
    import torch

    from supcon.core.errors import UsageError

    real = loop._stop_now
    monkeypatch.setattr(loop, "_stop_now", lambda run, s, steps: s == 2 or real(run, s, steps))
    with pytest.raises(Interrupted) as e:
        _train(tmp_path / "r")
    monkeypatch.setattr(loop, "_stop_now", real)
    path = e.value.checkpoint
    ckpt = torch.load(path, weights_only=True)
    damage(ckpt)
    torch.save(ckpt, path)
    with pytest.raises(UsageError, match=match) as err:
        _train(tmp_path / "r", resume=True)
    assert "\n" not in str(err.value) and path.name in str(err.value)
