"""How often the loss and the augmentation make the host wait for the device (counted on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import supcon.data.imageops as imageops
import supcon.losses.inputs as loss_inputs
from supcon.data.augment import BatchAugment
from supcon.losses.supcon import supcon_loss
from sync_counter import SyncCounter

pytestmark = pytest.mark.usefixtures("one_thread")


def test_counter_sees_the_ops_that_wait():
    x = torch.tensor([0.0, 1.0, 2.0])
    with SyncCounter() as c:
        x.sum().item()
        bool(x.any())
        torch.nonzero(x)
        torch.unique(x)
        torch.bincount(x.long())
        x[x > 0]
        x.tolist()
        x.numpy()
        torch.repeat_interleave(x, torch.tensor([1, 2, 0]))
        # these do not wait
        torch.repeat_interleave(x, torch.tensor([1, 2, 0]), output_size=3)
        torch.where(x > 0, x, 0.0).sum()
        x[torch.tensor([0, 2])]
    assert c.counts == {
        "aten::_local_scalar_dense": 2,  # item() and bool()
        "aten::nonzero": 1,
        "aten::_unique2": 1,
        "aten::bincount": 1,
        "aten::index(bool mask)": 1,
        "Tensor.tolist": 1,
        "Tensor.numpy": 1,
        "aten::repeat_interleave": 1,
    }, c.counts
    assert c.total == 9
    assert c.uploads["aten::lift_fresh"] >= 1  # the torch.tensor([...]) repeats
    # the wrapped methods are put back, also after nesting
    assert "tolist" not in torch.Tensor.__dict__ and "numpy" not in torch.Tensor.__dict__
    assert isinstance(x.numpy(), np.ndarray)


def test_counter_nests_and_filters_by_device():
    x = torch.ones(3)
    with SyncCounter() as outer:
        with SyncCounter() as inner:
            x.tolist()
        x.sum().item()
    assert inner.total == 1 and outer.total == 2
    with SyncCounter("cuda") as c:  # CPU tensors are not the device's
        x.tolist()
        x.sum().item()
    assert c.total == 0


def _loss_syncs(labels, **kwargs):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(16, 2, 8, generator=gen, requires_grad=True)
    supcon_loss(features, labels, **kwargs).backward()  # warm-up
    with SyncCounter() as c:
        supcon_loss(features, labels, **kwargs).backward()
    return c


LABELS = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("labels", "kwargs"),
    [
        (LABELS, {}),
        (LABELS, {"chunk_size": 5}),
        (LABELS, {"variant": "in"}),
        (LABELS, {"variant": "npairs"}),
        (None, {}),
        (LABELS[:, None] == LABELS[None, :], {}),
    ],
    ids=["labels", "tiled", "in", "npairs", "simclr", "mask"],
)
def test_loss_forward_backward_does_not_wait(labels, kwargs):
    # Before: torch.unique (class ids) and bincount (positives per class) each waited, 2 per step.
    # Now the classes come from a sort and the counts from an index_add_ bounded by N: none left.
    c = _loss_syncs(labels, **kwargs)
    assert c.total == 0, c.counts


def test_tensor_temperature_is_read_only_on_the_cpu():
    # Its value is checked where that costs nothing: one read of a CPU tensor; a device tensor is
    # used as it is (reading it would wait).
    c = _loss_syncs(LABELS, temperature=torch.tensor(0.2))
    assert c.counts == {"aten::_local_scalar_dense": 1}, c.counts
    meta = torch.tensor(0.2, device="meta")
    assert loss_inputs.check_temperature_tensor(meta) is None


def _augment_syncs(aug: BatchAugment):
    x = torch.randint(0, 256, (16, 12, 12, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    aug(x, views=2, generator=torch.Generator().manual_seed(3))  # warm-up: builds the constants
    with SyncCounter() as c:
        aug(x, views=2, generator=torch.Generator().manual_seed(3))
    return c


def test_augment_off_the_cpu_does_not_wait(monkeypatch):
    # Before: 9 per call (bool(is_blend.any()) at each of the 4 jitter positions, 4 nonzero for the
    # hue rows, bool(gray.any())) and 15 constants uploaded. The path used off the CPU has none.
    monkeypatch.setattr(imageops, "BRANCH_FREE_CPU", True)
    c = _augment_syncs(BatchAugment())
    assert c.total == 0, c.counts
    assert not c.uploads, c.uploads


def test_augment_on_the_cpu_reads_only_the_hue_rows():
    # The CPU keeps one nonzero per jitter position to shift the hue of only the rows that take it
    # there (where nothing waits, and it is the faster way).
    c = _augment_syncs(BatchAugment())
    assert c.total <= 4 and set(c.counts) <= {"aten::nonzero"}, c.counts
    assert not c.uploads, c.uploads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_cuda_sync_in_loss_and_augment():
    dev = torch.device("cuda")
    aug = BatchAugment()
    x = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    labels = torch.randint(0, 10, (64,), device=dev)
    features = torch.randn(64, 2, 128, device=dev, requires_grad=True)

    def run():
        aug(x, views=2, generator=g)
        supcon_loss(features, labels).backward()

    run()  # warm-up: constants, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
