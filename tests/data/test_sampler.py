"""Epoch order: uniform shuffle, class-balanced and square-root sampling; determinism, target class
frequencies, an exact mid-epoch resume, and disjoint shares across two processes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import _dist_worker as worker  # tests/ is on sys.path under pytest, and spawn passes it on
from launch import spawn
from supcon.core.dist import free_port
from supcon.core.errors import UsageError
from supcon.data.sampler import class_probabilities, epoch_order, order_fn

pytestmark = pytest.mark.usefixtures("one_thread")

COUNTS = [1000, 100, 10, 1]


def _labels(counts=COUNTS, seed=0) -> torch.Tensor:
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_uniform_is_the_loops_own_shuffle():
    y = _labels()
    assert torch.equal(epoch_order(y, "uniform", _gen(5)), torch.randperm(len(y), generator=_gen(5)))
    assert order_fn(y, "uniform") is None  # the loop keeps its torch.randperm: bit-identical runs


def test_orders_are_deterministic_and_index_the_training_set():
    y = _labels()
    for kind in ("class-balanced", "sqrt"):
        a, b = epoch_order(y, kind, _gen(1)), epoch_order(y, kind, _gen(1))
        assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (len(y),)
        assert int(a.min()) >= 0 and int(a.max()) < len(y)
        assert not torch.equal(a, epoch_order(y, kind, _gen(2)))
        # The function over the loop's generator: the same draws, one epoch after another.
        g, fn = _gen(1), order_fn(y, kind)
        assert torch.equal(fn(g), a) and not torch.equal(fn(g), a)


def _chi_square(observed: torch.Tensor, p: torch.Tensor) -> float:
    expected = p * observed.sum()
    return float(((observed.double() - expected) ** 2 / expected).sum())


# 99.9% quantiles of the chi-square distribution by degrees of freedom (fixed seeds: never flaky).
CHI2_999 = {3: 16.27, 9: 27.88}


@pytest.mark.parametrize("kind", ["class-balanced", "sqrt"])
def test_class_frequencies_converge_to_the_target(kind):
    y = _labels()
    sq = torch.tensor(COUNTS, dtype=torch.float64).sqrt()
    target = torch.full((4,), 0.25, dtype=torch.float64) if kind == "class-balanced" else sq / sq.sum()
    torch.testing.assert_close(class_probabilities(y, kind), target)
    g = _gen(7)
    drawn = torch.cat([epoch_order(y, kind, g) for _ in range(4)])  # 4,444 draws
    classes = torch.bincount(y[drawn], minlength=4)
    assert _chi_square(classes, target) < CHI2_999[3], classes.tolist()
    # Within a class, images are drawn uniformly (with replacement): the 10 images of class 2.
    members = torch.nonzero(y == 2).flatten()
    picks = drawn[y[drawn] == 2]
    per_image = (picks[:, None] == members[None, :]).sum(0)
    assert _chi_square(per_image, torch.full((10,), 0.1, dtype=torch.float64)) < CHI2_999[9]
    # and the one image of class 3 is drawn about as often as all of class 2 (balanced) or 1/sqrt(10) of it
    ratio = float((y[drawn] == 3).sum()) / float(len(picks))
    assert ratio == pytest.approx(1.0 if kind == "class-balanced" else 1 / math.sqrt(10), rel=0.25)


def test_absent_class_ids_are_never_drawn():
    y = torch.tensor([0, 0, 0, 2, 2, 5])  # classes 1, 3 and 4 have no image
    drawn = torch.cat([epoch_order(y, "class-balanced", _gen(s)) for s in range(200)])
    assert set(y[drawn].tolist()) == {0, 2, 5}


def test_unknown_kind_is_refused():
    with pytest.raises(UsageError, match="data.sampler must be one of"):
        order_fn(_labels(), "balanced")


def _fit(tmp_path, kind: str, stop_at: int | None = None, resume: bool = False):
    from supcon.core.stop import Interrupted
    from supcon.runs.open import open_run
    from supcon.train.loop import fit

    run = open_run(worker.sampler_config(kind), tmp_path / "run", resume=resume, progress=False)
    seen: list = []
    phase = worker.recording_phase(run, worker.sampler_labels(), seen, stop_at)
    try:
        fit(phase, run)
    except Interrupted:
        pass
    finally:
        run.close()
    return seen, {k: v.clone() for k, v in phase.module.state_dict().items()}


@pytest.mark.parametrize("kind", ["class-balanced", "sqrt"])
def test_a_mid_epoch_resume_continues_the_same_order(tmp_path, kind):
    straight, w_straight = _fit(tmp_path / "straight", kind)
    assert len(straight) == 10  # 2 epochs of 5 steps (40 images, batches of 8)
    stopped, _ = _fit(tmp_path / "stopped", kind, stop_at=7)  # in the second epoch, after its 2nd step
    assert len(stopped) == 7
    rest, w_resumed = _fit(tmp_path / "stopped", kind, resume=True)
    assert len(rest) == 3
    for a, b in zip(straight, stopped + rest, strict=True):
        assert torch.equal(a, b)
    for k in w_straight:
        assert torch.equal(w_straight[k], w_resumed[k]), k
    # The order really is rebalanced: a shuffle shows the 3 images of class 2 six times in 2 epochs.
    y = worker.sampler_labels()
    assert int((y[torch.cat(straight)] == 2).sum()) > 6


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_take_disjoint_shares_of_one_order(tmp_path):
    from supcon.train.loop import PHASE_IDS
    from supcon.train.rng import stream_seeds

    spawn(worker.sampler_run, (free_port(), str(tmp_path)), worker.WORLD, 120)
    ranks = [torch.load(tmp_path / f"sampler-rank{r}.pt") for r in range(worker.WORLD)]
    # The order one process draws from the data-order stream, cut into global batches of 8.
    cfg, y = worker.sampler_config("class-balanced"), worker.sampler_labels()
    g = torch.Generator().manual_seed(stream_seeds(cfg.seed, PHASE_IDS["ce"], 0)[0])
    batches = [b for _ in range(cfg.ce.epochs) for b in epoch_order(y, "class-balanced", g).split(8)]
    assert len(ranks[0]) == len(ranks[1]) == len(batches) == 10
    for batch, share0, share1 in zip(batches, *ranks, strict=True):
        # each rank takes its own contiguous half of every batch: together the batch, no position twice
        assert torch.equal(share0, batch[:4]) and torch.equal(share1, batch[4:])


def test_every_phase_hands_the_loop_the_configured_order(tmp_path, monkeypatch):
    from supcon.core.config import Config
    from supcon.data.datasets import load_split
    from supcon.runs.open import open_run
    from supcon.train import phases

    captured = []
    monkeypatch.setattr(phases, "fit", lambda phase, run: captured.append(phase))
    cfg = Config(device="cpu", precision="fp32")
    cfg.data.sampler = "sqrt"
    run = open_run(cfg, tmp_path / "run", progress=False)
    try:
        data, split = load_split(cfg.data, cfg.seed, progress=False)
        phases.train_ce(run, data, split)
        pre = phases.pretrain(run, data, split)
        phases.train_linear(run, data, split, pre.encoder)  # the linear probe
    finally:
        run.close()
    assert [p.name for p in captured] == ["ce", "pretrain", "linear"]
    want = epoch_order(split.train_y, "sqrt", _gen(9))
    for phase in captured:
        assert torch.equal(phase.order(_gen(9)), want), phase.name
