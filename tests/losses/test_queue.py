"""LabelQueue: FIFO ring order, empty slots, checkpoint round trip, agreement across two ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import _dist_worker as worker  # tests/ is on sys.path under pytest, and spawn passes it on
from launch import spawn
from supcon.core.dist import free_port
from supcon.losses.queue import LabelQueue
from supcon.losses.supcon import supcon_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_fifo(batches, size):
    """The newest ``size`` rows of all batches, oldest first (a plain list model of the ring)."""
    rows = [(f, y) for feats, labels in batches for f, y in zip(feats, labels, strict=True)]
    return rows[-size:]


def as_fifo(queue: LabelQueue):
    """The queue's entries oldest first: from the write position round the ring once it is full."""
    feats, labels = queue.keys()
    if queue.filled == queue.size:
        order = [(queue.ptr + i) % queue.size for i in range(queue.size)]
        feats, labels = feats[order], labels[order]
    return feats, labels


def test_fifo_order_and_wrap_around():
    gen = torch.Generator().manual_seed(0)
    queue = LabelQueue(5, 3)
    assert len(queue) == 0 and queue.keys()[0].shape == (0, 3) and queue.keys()[1].shape == (0,)
    batches = []
    for b in (2, 0, 2, 3, 1, 7, 4):  # fills, wraps, and one batch larger than the queue
        batch = (
            torch.randn(b, 3, generator=gen),
            torch.randint(0, 9, (b,), generator=gen, dtype=torch.int32),
        )
        batches.append(batch)
        queue.enqueue(*batch)
        want = reference_fifo(batches, 5)
        feats, labels = as_fifo(queue)
        assert len(queue) == len(want) == feats.shape[0]
        assert torch.equal(feats, torch.stack([f for f, _ in want]))
        assert labels.tolist() == [int(y) for _, y in want]
        assert labels.dtype == torch.long
    # the write position moved by every row, modulo the size
    assert queue.ptr == (2 + 0 + 2 + 3 + 1 + 5 + 4) % 5 == 2


def test_views_are_entries_view_major():
    queue = LabelQueue(8, 2)
    feats = torch.arange(12.0).reshape(3, 2, 2)  # [b, V, dim]
    queue.enqueue(feats, torch.tensor([4, 5, 6]))
    got_feats, got_labels = queue.keys()
    assert torch.equal(got_feats, torch.cat([feats[:, 0], feats[:, 1]]))
    assert got_labels.tolist() == [4, 5, 6, 4, 5, 6]


def test_empty_slots_take_no_part_in_the_loss():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(6, 2, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    queue = LabelQueue(10, 4, dtype=torch.float64)
    entries = F.normalize(torch.randn(3, 4, generator=gen, dtype=torch.float64), dim=1)
    queue.enqueue(entries, torch.tensor([1, 3, 5]))
    assert queue.labels[3:].eq(-1).all()  # empty slots are marked
    keys, key_labels = queue.keys()
    got = supcon_loss(features, labels, keys=keys, key_labels=key_labels)
    want = supcon_loss(features, labels, keys=entries, key_labels=torch.tensor([1, 3, 5]))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # an empty queue is no keys at all
    empty = LabelQueue(4, 4, dtype=torch.float64)
    torch.testing.assert_close(
        supcon_loss(features, labels, keys=empty.keys()[0], key_labels=empty.keys()[1]),
        supcon_loss(features, labels),
        rtol=1e-14,
        atol=1e-14,
    )


def test_multi_hot_queue():
    queue = LabelQueue(3, 2, classes=4)
    assert queue.keys()[1].shape == (0, 4)
    queue.enqueue(torch.ones(2, 2), torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0]]))
    queue.enqueue(torch.zeros(2, 2), torch.tensor([[0, 1, 0, 0], [1, 1, 1, 1]]))
    feats, labels = as_fifo(queue)
    assert labels.dtype == torch.bool
    assert labels.int().tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]]
    assert feats.tolist() == [[1, 1], [0, 0], [0, 0]]


def test_state_round_trip_resumes_exactly():
    gen = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(b, 3, generator=gen), torch.randint(0, 5, (b,), generator=gen)) for b in (3, 2, 3)
    ]
    queue = LabelQueue(4, 3)
    for batch in batches[:2]:
        queue.enqueue(*batch)
    state = queue.state_dict()
    saved = state["features"].clone()
    queue.enqueue(torch.full((1, 3), 9.0), torch.tensor([7]))  # the original moves on
    assert torch.equal(state["features"], saved)  # the state is a copy
    restored = LabelQueue(4, 3)
    restored.load_state_dict(torch.load(_save(state)))  # through a checkpoint file's bytes
    assert (restored.ptr, restored.filled) == (1, 4)
    # the restored queue continues exactly as one that never stopped
    uninterrupted = LabelQueue(4, 3)
    for batch in batches:
        uninterrupted.enqueue(*batch)
    restored.enqueue(*batches[2])
    assert torch.equal(restored.features, uninterrupted.features)
    assert torch.equal(restored.labels, uninterrupted.labels)
    assert (restored.ptr, restored.filled) == (uninterrupted.ptr, uninterrupted.filled)


def _save(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: LabelQueue(0, 3), "size must be an integer >= 1"),
        (lambda: LabelQueue(4, 3, classes=0), "classes must be"),
        (lambda: LabelQueue(4, 3).enqueue(torch.randn(2, 4), torch.arange(2)), r"\[b, 3\].*\(2, 4\)"),
        (lambda: LabelQueue(4, 3).enqueue(torch.randn(2, 3), torch.arange(3)), r"shape \(2,\).*\(3,\)"),
        (lambda: LabelQueue(4, 3).enqueue(torch.randn(2, 3), torch.ones(2)), "integer class ids"),
        (lambda: LabelQueue(4, 3).load_state_dict(LabelQueue(5, 3).state_dict()), r"saved queue holds"),
        (
            lambda: LabelQueue(4, 3).load_state_dict({**LabelQueue(4, 3).state_dict(), "ptr": 2}),
            "position is out of range",
        ),
    ],
)
def test_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_hold_identical_queues(tmp_path):
    spawn(worker.run_queue, (free_port(), str(tmp_path)), worker.WORLD, 120)
    results = [torch.load(tmp_path / f"queue_rank{r}.pt") for r in range(worker.WORLD)]
    for multi in (False, True):
        key = "multi" if multi else "labels"
        # one process fed every rank's rows in rank order, step by step
        single = LabelQueue(5, 3, classes=4 if multi else None)
        for step in range(len(worker.QUEUE_STEPS)):
            parts = [worker.queue_batch(step, r, multi) for r in range(worker.WORLD)]
            single.enqueue(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            want = single.state_dict()
            for res in results:
                got = res[key][step]
                assert (got["ptr"], got["filled"]) == (want["ptr"], want["filled"])
                assert torch.equal(got["features"], want["features"])
                assert torch.equal(got["labels"], want["labels"])
        assert single.filled == 5  # the steps wrapped the ring


def test_enqueue_and_keys_do_not_wait_for_the_device():
    from sync_counter import SyncCounter

    queue = LabelQueue(6, 3, classes=2)
    queue.enqueue(torch.randn(4, 3), torch.ones(4, 2))  # warm-up
    with SyncCounter() as c:
        queue.enqueue(torch.randn(4, 3), torch.ones(4, 2))
        queue.keys()
    assert c.total == 0, c.counts
    assert queue.filled == 6 and queue.ptr == 2
