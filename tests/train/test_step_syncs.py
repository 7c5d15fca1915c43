"""Host waits per training step of the trainer, counted on the CPU as they would occur on a GPU."""

import pytest

from _syncs import STEPS, epoch_syncs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_contrastive_step_waits_at_most_once_per_step_on_average(tmp_path, monkeypatch):
    # The paper's pipeline (augmented views, MLP head, ResNet): the loss and the loop wait for nothing
    # in a step; what remains is the augmentation's hue row selection on the CPU (its GPU path uses
    # where() instead) and the loop's reads of the running loss every CHECK_EVERY steps.
    overrides = {"model.encoder": "resnet18", "model.width": 8, "model.blocks": [1, 1, 1, 1],
                 "model.projection": "mlp", "pretrain.augment": "supcon", "pretrain.views": 2,
                 "loss.variant": "out"}  # fmt: skip
    per_step, counts = epoch_syncs(tmp_path, monkeypatch, "pretrain", overrides)
    hue = counts.get("aten::nonzero", 0)
    assert per_step - hue / STEPS <= 0.2, counts  # the loop: 2 running-loss reads + 1 epoch read


def test_cross_entropy_step_waits_only_for_the_loops_reads(tmp_path, monkeypatch):
    per_step, counts = epoch_syncs(tmp_path, monkeypatch, "train_ce", {})
    assert per_step <= 0.2, counts
