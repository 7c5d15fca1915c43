"""The negative pairs' similarity (collapse.negative_similarity) against a loop over pairs, and the
collapse warning the training loop prints from it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from supcon.core.config import Config, PhaseConfig
from supcon.core.runtime import Runtime
from supcon.train import collapse, loop
from supcon.train.context import Run


def _reference(z: torch.Tensor, labels) -> tuple[float, int]:
    """Sum and number of cosine similarities over ordered pairs of rows that should be apart."""
    b, v, d = z.shape
    rows = torch.nn.functional.normalize(z.double().reshape(b * v, d), dim=1)
    total, n = 0.0, 0
    for i in range(b * v):
        for j in range(b * v):
            si, sj = i // v, j // v
            if i == j:
                continue
            if labels is None:
                negative = si != sj
            elif labels.dim() == 1:
                negative = bool(labels[si] != labels[sj])
            else:
                negative = not bool((labels[si].bool() & labels[sj].bool()).any())
            if negative:
                total += float(rows[i] @ rows[j])
                n += 1
    return total, n


@pytest.mark.parametrize("kind", ["labels", "simclr", "multilabel"])
def test_negative_similarity_matches_a_loop_over_pairs(kind, monkeypatch):
    monkeypatch.setattr(collapse, "_ROWS", 5)  # several blocks of rows (multi-label)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 2, 6, generator=g) * 3
    labels = {
        "labels": torch.tensor([0, 3, 3, 1, 0, 5, 3]),
        "simclr": None,
        "multilabel": torch.tensor(
            [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0]]
        ),
    }[kind]
    got = collapse.negative_similarity(z, labels, num_classes=6)
    total, n = _reference(z, labels)
    assert got.tolist() == pytest.approx([total, n], rel=1e-5, abs=1e-4)


def test_alike_projections_read_one_and_opposite_classes_minus_one():
    same = torch.ones(4, 2, 3)
    s, n = collapse.negative_similarity(same, torch.tensor([0, 1, 0, 1]), 2).tolist()
    assert s / n == pytest.approx(1.0)
    apart = torch.tensor([1.0, 0.0]).repeat(4, 2, 1) * torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None, None]
    s, n = collapse.negative_similarity(apart, torch.tensor([0, 1, 0, 1]), 2).tolist()
    assert (s / n, n) == (pytest.approx(-1.0), 32)  # 8 rows: 4 of each class, 2 * 4 * 4 pairs


def _phase(cos: float, epochs: int, warmup_epochs: float = 0.0) -> loop.Phase:
    model = nn.Linear(4, 3)
    x = torch.randn(10, 4)

    def step(b, n_global, g):
        loss = model(x[b.idx]).square().mean()
        pairs = torch.tensor(float(len(b.idx) * 6))
        return loop.StepOut(loss, loss, negatives=torch.stack([cos * pairs, pairs]))

    cfg = PhaseConfig(epochs=epochs, batch_size=4, optimizer="sgd", lr=0.01, warmup_epochs=warmup_epochs)
    return loop.Phase("pretrain", cfg, model, list(model.parameters()), step, 10)


@pytest.mark.parametrize("cos, warned", [(0.99, True), (0.5, False)])
def test_the_loop_records_it_and_warns_once_from_epoch_two(tmp_path, monkeypatch, capsys, cos, warned):
    monkeypatch.setattr(loop, "_save", lambda *a, **k: tmp_path / "not-saved.pt")
    run = Run(Config(), Runtime(torch.device("cpu"), None, False), tmp_path, progress=False)
    history = loop.fit(_phase(cos, epochs=3), run)
    assert [r["neg_cos"] for r in history] == [pytest.approx(cos)] * 3
    lines = [x for x in capsys.readouterr().err.splitlines() if "collapsed" in x]
    expected = ["supcon: warning: pretrain epoch 2: the projections have collapsed"] if warned else []
    assert [x.split(" (")[0] for x in lines] == expected


@pytest.mark.parametrize("warmup, first", [(0, 2), (1, 2), (2.5, 4), (10, None)])
def test_epochs_inside_the_warm_up_are_not_judged(tmp_path, monkeypatch, capsys, warmup, first):
    # Seen on a GPU with the paper's recipe: 0.99 at epoch 2 of a 10-epoch warm-up, in a run that
    # learns; the warning came too early to mean anything.
    monkeypatch.setattr(loop, "_save", lambda *a, **k: tmp_path / "not-saved.pt")
    run = Run(Config(), Runtime(torch.device("cpu"), None, False), tmp_path, progress=False)
    loop.fit(_phase(0.99, epochs=5, warmup_epochs=warmup), run)
    lines = [x for x in capsys.readouterr().err.splitlines() if "collapsed" in x]
    assert [x.split(":")[2].strip() for x in lines] == ([] if first is None else [f"pretrain epoch {first}"])


def test_a_warning_inside_the_warm_up_is_not_counted_as_said():
    history = [{"epoch": 1, "neg_cos": 0.99}, {"epoch": 2, "neg_cos": 0.99}]
    assert not collapse.warn_if_collapsed("pretrain", history[:1], history[1], warmup_epochs=3)
    assert collapse.warn_if_collapsed("pretrain", history, {"epoch": 4, "neg_cos": 0.985}, warmup_epochs=3)
