"""A device-free dry run of the training loop's bookkeeping on the ``meta`` device.

Meta tensors have a device but no data: any op that mixes them with a CPU tensor of more than one
element raises, as CUDA does. Running :func:`supcon.train.loop.fit` on ``meta`` checks that the loop keeps
its step bookkeeping, epoch totals and stop agreement on the compute device (stacking CUDA epoch
totals with a CPU tensor crashed every GPU run at the end of epoch 1). The loop reads device values
only through ``loop.host_read``, which the dry run answers with made-up values, and the checkpoint writes
are left out (meta tensors hold no data to save).
"""

import pytest
import torch
from torch import nn

from supcon.core.config import Config, PhaseConfig
from supcon.core.runtime import Runtime
from supcon.train import loop
from supcon.train.context import Run
from supcon.train.rng import Streams

META = torch.device("meta")


@pytest.fixture
def dry(monkeypatch, tmp_path):
    reads = []

    def host_read(t):
        assert t.device == META, f"a host read of a {t.device} tensor: the loop mixed devices"
        reads.append(t.numel())
        # 0 for a single value (a finite running loss, no stop requested), 1 for each epoch total.
        return [0.0] if t.numel() == 1 else [1.0] * t.numel()

    real = Streams.for_rank

    def for_rank(seed, phase_id, rank, device):
        # Generators need a real device; the augmentation stream is not used by the steps here.
        return real(seed, phase_id, rank, torch.device("cpu"))

    monkeypatch.setattr(loop, "host_read", host_read)
    monkeypatch.setattr(loop.Streams, "for_rank", staticmethod(for_rank))
    monkeypatch.setattr(loop, "_save", lambda *a, **k: tmp_path / "not-saved.pt")
    run = Run(Config(), Runtime(META, None, False), tmp_path, progress=False)
    return run, reads


def _phase(name: str, with_correct: bool):
    model = nn.Linear(4, 3).to(META)
    x = torch.empty(10, 4, device=META)
    y = torch.zeros(10, dtype=torch.long, device=META)

    def step(b, n_global, g):
        idx = b.idx
        logits = model(x[idx.to(META)])
        loss = nn.functional.cross_entropy(logits, y[idx.to(META)])
        correct = (logits.argmax(1) == y[idx.to(META)]).sum() if with_correct else None
        return loop.StepOut(loss, loop.ddp_share(loss, len(idx), n_global), correct)

    cfg = PhaseConfig(epochs=2, batch_size=4, optimizer="sgd", lr=0.1)
    return loop.Phase(name, cfg, model, list(model.parameters()), step, 10)


@pytest.mark.parametrize("name, with_correct", [("ce", True), ("pretrain", False), ("linear", True)])
def test_the_loop_keeps_its_bookkeeping_on_the_compute_device(dry, name, with_correct):
    run, reads = dry
    history = loop.fit(_phase(name, with_correct), run)
    assert [r["epoch"] for r in history] == [1, 2]
    # Host reads per epoch: the running loss at step 0 (3 steps of 4, 4, 2) and the epoch totals
    # (loss, correct, seen, and the negative pairs' cosine sum and count).
    assert reads == [1, 5, 1, 5]


def test_the_dry_run_catches_a_cpu_tensor_in_the_epoch_totals(dry, monkeypatch):
    run, _ = dry
    real_stack = torch.stack

    def old_totals(tensors, *a, **k):  # what the loop did before: the sample count on the CPU
        return real_stack([*tensors[:2], torch.tensor(1.0)], *a, **k)

    monkeypatch.setattr(torch, "stack", old_totals)
    with pytest.raises(RuntimeError, match="device"):
        loop.fit(_phase("ce", True), run)


@pytest.fixture
def two_ranks(monkeypatch):
    """Rank 0 of two, the collectives answered locally: each one records the device of its tensor."""
    from supcon.core import dist

    devices = []

    def all_reduce_sum(t):
        devices.append(t.device)
        return t.detach().clone()

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "all_reduce_sum", all_reduce_sum)
    return devices


def test_under_two_ranks_every_collective_of_the_loop_is_on_the_compute_device(dry, two_ranks):
    run, _ = dry
    phase = _phase("pretrain", False)
    phase.n_train, phase.cfg.batch_size = 40, 2  # 20 steps: a stop agreement at step 16 and at the end
    phase.step = _sharded(phase.step)
    loop.fit(phase, run)
    # Per epoch: stop agreements after steps 16 and 20, the epoch totals; then one at the epoch's end.
    assert len(two_ranks) == 7 and set(two_ranks) == {META}, two_ranks


def test_the_dry_run_catches_a_stop_flag_on_the_cpu(dry, two_ranks, monkeypatch):
    from supcon.core import dist
    from supcon.core.stop import StopFlag

    run, _ = dry
    # What the loop did before: the stop flag built on the CPU, whatever the compute device (NCCL
    # refuses it).
    monkeypatch.setattr(
        StopFlag, "requested_anywhere", lambda self, device="cpu": dist.all_reduce_sum(torch.tensor(0.0))
    )
    phase = _phase("pretrain", False)
    phase.n_train, phase.cfg.batch_size = 40, 2
    phase.step = _sharded(phase.step)
    with pytest.raises(AssertionError, match="host read of a cpu tensor"):
        loop.fit(phase, run)


def _sharded(step):
    # The indices the loop hands a rank are its share; the dry-run model takes any of the 10 rows.
    return lambda b, n_global, g: step(b._replace(idx=b.idx % 10), n_global, g)
