"""Host waits per training step of the trainer, counted on the CPU as they would occur on a GPU."""

import pytest

from supcon.core.config import Config, set_values
from supcon.core.runtime import resolve_runtime
from supcon.data.datasets import load_split
from supcon.train import loop, phases
from supcon.train.context import Run
from sync_counter import SyncCounter

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 40  # two of the loop's running-loss reads (every loop.CHECK_EVERY steps) and the epoch end


def _epoch_syncs(tmp_path, monkeypatch, command: str, overrides: dict) -> tuple[int, dict]:
    cfg = Config()
    set_values(cfg, {"data.dataset": "digits", "precision": "fp32", **overrides})
    rt = resolve_runtime("cpu", "fp32", True)
    data, split = load_split(cfg.data, cfg.seed, progress=False)
    phase_cfg = getattr(cfg, "pretrain" if command == "pretrain" else "ce")
    phase_cfg.batch_size = len(split.train_y) // STEPS + 1
    phase_cfg.epochs = 1
    monkeypatch.setattr(loop, "_save", lambda *a, **k: tmp_path / "not-saved.pt")
    run = Run(cfg, rt, tmp_path, progress=False)
    real_fit = loop.fit
    counted = {}

    def fit(phase, run):
        with SyncCounter() as c:
            real_fit(phase, run)
        counted.update(total=c.total, counts=dict(c.counts))

    monkeypatch.setattr(phases, "fit", fit)
    getattr(phases, command)(run, data, split)
    steps = -(-len(split.train_y) // phase_cfg.batch_size)
    return counted["total"] / steps, counted["counts"]


def test_contrastive_step_waits_at_most_once_per_step_on_average(tmp_path, monkeypatch):
    # The paper's pipeline (augmented views, MLP head, ResNet): the loss and the loop wait for nothing
    # in a step; what remains is the augmentation's hue row selection on the CPU (its GPU path uses
    # where() instead) and the loop's reads of the running loss every CHECK_EVERY steps.
    overrides = {"model.encoder": "resnet18", "model.width": 8, "model.blocks": [1, 1, 1, 1],
                 "model.projection": "mlp", "pretrain.augment": "supcon", "pretrain.views": 2,
                 "loss.variant": "out"}  # fmt: skip
    per_step, counts = _epoch_syncs(tmp_path, monkeypatch, "pretrain", overrides)
    hue = counts.get("aten::nonzero", 0)
    assert per_step - hue / STEPS <= 0.2, counts  # the loop: 2 running-loss reads + 1 epoch read


def test_cross_entropy_step_waits_only_for_the_loops_reads(tmp_path, monkeypatch):
    per_step, counts = _epoch_syncs(tmp_path, monkeypatch, "train_ce", {})
    assert per_step <= 0.2, counts
