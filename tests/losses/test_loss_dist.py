"""gather=True for real: two processes on the CPU (gloo), compared with one process on the full batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import _dist_worker as worker  # tests/ is on sys.path under pytest, and spawn passes it on
from launch import spawn
from supcon.core.dist import free_port
from supcon.losses.supcon import supcon_loss

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.usefixtures("one_thread"),
]

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    spawn(worker.run, (free_port(), str(outdir)), worker.WORLD, TIMEOUT_S)
    return [torch.load(outdir / f"rank{r}.pt") for r in range(worker.WORLD)]


CASES = worker.cases()


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.id for c in CASES])
def test_gathered_loss_equals_single_process(results, index):
    case = CASES[index]
    features, labels = worker.case_data(index, case)
    full = features.clone().requires_grad_(True)
    want = supcon_loss(full, labels, variant=case.variant, chunk_size=case.chunk)
    want.backward()
    tol = {"rtol": 1e-10, "atol": 1e-12} if case.dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-7}
    grads = []
    for rank in range(worker.WORLD):
        value, grad = results[rank]["cases"][case.id]
        assert value.dtype == want.dtype
        # every rank returns the global loss
        torch.testing.assert_close(value, want.detach(), **tol)
        grads.append(grad)
    # and each rank's features receive their slice of the single-process gradient
    torch.testing.assert_close(torch.cat(grads), full.grad, **tol)


def test_the_cases_have_positives_to_contrast(results):
    # a vacuous comparison (a zero loss everywhere) would prove nothing
    for index, case in enumerate(CASES):
        if sum(case.sizes) == 0:
            continue
        features, labels = worker.case_data(index, case)
        assert supcon_loss(features, labels, variant=case.variant) > 0.1, case.id


def test_helpers_across_two_ranks(results):
    rows = torch.arange(9, dtype=torch.float64)
    want_gathered = torch.cat([rows[:3].reshape(1, 3), rows[:6].reshape(2, 3)])
    weights = torch.arange(9, dtype=torch.float64).reshape(3, 3)
    grad_total = weights * 1 + weights * 2  # each rank weighs the gathered rows by (rank + 1)
    for rank, res in enumerate(r["helpers"] for r in results):
        assert res["rank"] == rank and res["world_size"] == 2 and res["is_dist"]
        assert res["is_main"] == (rank == 0)
        torch.testing.assert_close(res["gathered"], want_gathered)
        torch.testing.assert_close(res["grad"], grad_total[:1] if rank == 0 else grad_total[1:])
        assert res["nograd"].tolist() == [0, 0, 1]
        assert res["sum"].tolist() == [2.0, 1.0]
        assert res["sizes"] == [10, 11]


def test_ddp_training_gradient_is_exact_with_world_size_scaling(results):
    x, y = worker.ddp_data()
    model = worker.ddp_model()
    supcon_loss(model(x), y).backward()
    for res in results:
        for name, param in model.named_parameters():
            torch.testing.assert_close(res["ddp"][name], param.grad, rtol=1e-5, atol=1e-6)


def test_gathered_step_reads_the_host_once(results):
    # One read of every rank's [B, V, D]: the sizes shape the gather's padding and trimming on the
    # host. Before: one .item() per rank for the sizes, bool(any) for the check, .tolist() for the
    # sizes, then torch.unique and bincount for the classes (2 + world size).
    for res in results:
        assert res["gather_syncs"] == {"Tensor.tolist": 1}, res["gather_syncs"]


KEY_CASES = worker.key_cases()


@pytest.mark.parametrize("index", range(len(KEY_CASES)), ids=[c.id for c in KEY_CASES])
def test_gathered_loss_with_keys_equals_single_process(results, index):
    # Keys are the same on every rank and not gathered: each anchor sees every key once.
    case = KEY_CASES[index]
    features, labels, keys, key_labels, multilabel = worker.key_case_data(index, case)
    full = features.clone().requires_grad_(True)
    want = supcon_loss(
        full,
        labels,
        variant=case.variant,
        chunk_size=case.chunk,
        keys=keys,
        key_labels=key_labels,
        multilabel=multilabel,
    )
    want.backward()
    grads = []
    for rank in range(worker.WORLD):
        value, grad = results[rank]["key_cases"][case.id]
        torch.testing.assert_close(value, want.detach(), rtol=1e-10, atol=1e-12)
        grads.append(grad)
    torch.testing.assert_close(torch.cat(grads), full.grad, rtol=1e-10, atol=1e-12)
    # the keys count: the loss without them differs (not a vacuous comparison)
    if case.n_keys:
        without = supcon_loss(features, labels, variant=case.variant, multilabel=multilabel)
        assert (without - want).abs() > 1e-3, case.id
