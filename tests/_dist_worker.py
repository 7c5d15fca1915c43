"""One rank of the two-process tests in test_loss_dist.py (gloo on 127.0.0.1, CPU).

The cases are built from seeds on every rank, so the parent process can rebuild the full batch and
compute the single-process loss to compare with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

WORLD = 2


@dataclass(frozen=True)
class Case:
    variant: str
    mode: str  # "labels", "simclr" or "mask"
    sizes: tuple[int, int]  # samples held by rank 0 and rank 1
    chunk: int | None
    dtype: torch.dtype = torch.float64
    views: int = 2
    # "slice": each rank's features are a slice of the batch's [B, V, D]; "trainer": they are the
    # view-major rows [V * b, D] of an encoder's output, split into [b, V, D] as the trainer must,
    # which for an empty share (b = 0) has to name the feature size rather than infer it.
    layout: str = "slice"

    @property
    def id(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        sizes = f"{self.sizes[0]}+{self.sizes[1]}"
        layout = "" if self.layout == "slice" else f"-{self.layout}"
        return f"{self.variant}-{self.mode}-{sizes}-chunk{self.chunk}-{dtype}-v{self.views}{layout}"


def cases() -> list[Case]:
    out = [
        Case(variant, mode, sizes, chunk)
        for variant in ("out", "in", "npairs")
        for mode in ("labels", "simclr", "mask")
        for sizes in ((5, 5), (3, 6))
        for chunk in (None, 4)
    ]
    out += [
        Case("out", "labels", (0, 7), None),
        Case("in", "mask", (7, 0), 3),
        Case("out", "labels", (8, 5), None, torch.float32),
        Case("npairs", "labels", (6, 6), 5, torch.float32, views=1),
        Case("out", "simclr", (4, 2), 2, views=3),
        # A rank with an empty share, its features shaped as in training.
        Case("out", "labels", (0, 7), None, layout="trainer"),
        Case("npairs", "labels", (5, 0), 2, torch.float32, layout="trainer"),
        Case("in", "simclr", (0, 6), None, views=3, layout="trainer"),
        Case("out", "mask", (6, 0), None, layout="trainer"),
        Case("out", "labels", (0, 0), None, layout="trainer"),
        Case("in", "mask", (0, 0), 2),
    ]
    return out


def case_data(index: int, case: Case):
    """Full-batch features [B, V, D] and labels (class ids, None or a [B, B] mask) of a case."""
    gen = torch.Generator().manual_seed(1000 + index)
    batch = sum(case.sizes)
    features = torch.randn(batch, case.views, 8, generator=gen, dtype=torch.float64).to(case.dtype)
    if case.mode == "labels":
        labels = torch.randint(0, 3, (batch,), generator=gen)
    elif case.mode == "mask":
        labels = torch.rand(batch, batch, generator=gen) < 0.3
        labels.fill_diagonal_(True)
    else:
        labels = None
    return features, labels


def local_part(case: Case, rank: int, features, labels):
    start = sum(case.sizes[:rank])
    stop = start + case.sizes[rank]
    if labels is not None:
        labels = labels[start:stop]  # mask rows: this rank's samples, columns: all samples
    return features[start:stop], labels


def rank_features(case: Case, features: torch.Tensor):
    """(leaf tensor, what the loss is given, the leaf's gradient as [b, V, D]) for one rank."""
    if case.layout == "slice":
        leaf = features.clone().requires_grad_(True)
        return leaf, leaf, lambda: leaf.grad
    from supcon.data.augment import split_views

    # An encoder's output: rows v * b + i, one per view of each local image (none for b = 0).
    rows = features.transpose(0, 1).reshape(-1, features.shape[2]).clone().requires_grad_(True)
    return rows, split_views(rows, case.views), lambda: split_views(rows.grad, case.views)


def ddp_data():
    gen = torch.Generator().manual_seed(77)
    x = torch.randn(12, 2, 6, generator=gen)
    y = torch.randint(0, 3, (12,), generator=gen)
    return x, y


def ddp_model():
    torch.manual_seed(5)
    return torch.nn.Linear(6, 4)


def run(rank: int, port: int, outdir: str) -> None:
    from launch import join_local_group

    join_local_group(rank, port, WORLD)
    from supcon.core import dist as sdist
    from supcon.losses.supcon import supcon_loss
    from sync_counter import SyncCounter

    # Every collective below is checked against NCCL's rules: correct use must pass them.
    sdist.set_strict("cpu")
    results: dict = {"cases": {}}
    for index, case in enumerate(cases()):
        features, labels = local_part(case, rank, *case_data(index, case))
        _, given, grad = rank_features(case, features)
        loss = supcon_loss(given, labels, variant=case.variant, chunk_size=case.chunk, gather=True)
        loss.backward()
        results["cases"][case.id] = (loss.detach(), grad())
    run_key_cases(rank, results)

    # Host waits of one gathered step (strict mode off: its checks read on the host too).
    sdist.set_strict(None)
    features, labels = local_part(cases()[0], rank, *case_data(0, cases()[0]))
    features = features.clone().requires_grad_(True)
    with SyncCounter() as counter:
        supcon_loss(features, labels, gather=True).backward()
    results["gather_syncs"] = dict(counter.counts)
    sdist.set_strict("cpu")

    # The helpers on their own: rows of different lengths, gradients routed back to their owners.
    x = torch.arange(3 * (rank + 1), dtype=torch.float64).reshape(rank + 1, 3).requires_grad_(True)
    gathered = sdist.all_gather_with_grad(x)
    weights = torch.arange(gathered.numel(), dtype=torch.float64).reshape(gathered.shape) * (rank + 1)
    (gathered * weights).sum().backward()
    results["helpers"] = {
        "rank": sdist.rank(),
        "world_size": sdist.world_size(),
        "is_main": sdist.is_main(),
        "is_dist": sdist.is_dist(),
        "gathered": gathered.detach(),
        "grad": x.grad,
        "nograd": sdist.all_gather_nograd(torch.tensor([rank] * (2 - rank))),
        "sum": sdist.all_reduce_sum(torch.tensor([1.0, rank])),
        "sizes": sdist.all_gather_sizes(10 + rank),
    }

    # Training as the docstring says: DDP averages gradients, so the loss is scaled by the world size.
    x, y = ddp_data()
    half = x.shape[0] // WORLD
    model = torch.nn.parallel.DistributedDataParallel(ddp_model())
    feats = model(x[rank * half : (rank + 1) * half])
    loss = supcon_loss(feats, y[rank * half : (rank + 1) * half], gather=True) * sdist.world_size()
    loss.backward()
    results["ddp"] = {name: p.grad for name, p in model.module.named_parameters()}

    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- data order (test_sampler.py)

SAMPLER_COUNTS = (30, 7, 3)  # a long-tailed toy training set: 40 images, three classes


def sampler_labels() -> torch.Tensor:
    """Labels [40] of the toy training set, classes interleaved."""
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(SAMPLER_COUNTS)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(3))]


def sampler_config(kind: str, epochs: int = 2, batch_size: int = 8):
    from supcon.core.config import Config

    cfg = Config(device="cpu", precision="fp32", seed=4)
    cfg.data.sampler = kind
    cfg.ce.epochs, cfg.ce.batch_size, cfg.ce.lr = epochs, batch_size, 0.01
    return cfg


def recording_phase(run, labels: torch.Tensor, seen: list, stop_at: int | None = None):
    """A ``ce`` phase over ``labels`` whose step records this rank's indices (and asks to stop after
    ``stop_at`` steps); its loss depends on the indices, so the weights do too."""
    from supcon.data.sampler import order_fn
    from supcon.train.loop import Phase, StepOut, ddp_share

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 3)
    x = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(1))

    def step(b, n_global, g):
        idx = b.idx
        seen.append(idx.clone())
        if stop_at is not None and len(seen) == stop_at:
            run.stop.requested = True
        loss = (
            torch.nn.functional.cross_entropy(model(x[idx]), labels[idx])
            if len(idx)
            else model.bias.sum() * 0
        )
        return StepOut(loss.detach(), ddp_share(loss, len(idx), n_global))

    order = order_fn(labels, run.cfg.data.sampler)
    return Phase("ce", run.cfg.ce, model, list(model.parameters()), step, len(labels), None, order)


def sampler_run(rank: int, port: int, outdir: str) -> None:
    """Both ranks train the recording phase with class-balanced order; each saves the indices it saw."""
    from pathlib import Path

    from launch import join_local_group

    join_local_group(rank, port, WORLD)
    from supcon.runs.open import open_run
    from supcon.train.loop import fit

    run = open_run(sampler_config("class-balanced"), Path(outdir) / "run", progress=False)
    seen: list = []
    try:
        fit(recording_phase(run, sampler_labels(), seen), run)
    finally:
        run.close()
    torch.save(seen, os.path.join(outdir, f"sampler-rank{rank}.pt"))


# ---------------------------------------------------------------------------------------------
# Extra keys under gather (test_loss_dist.py) and the label queue (test_queue.py).


@dataclass(frozen=True)
class KeyCase:
    variant: str
    mode: str  # "labels", "simclr", or a multilabel rule ("jaccard", "any")
    sizes: tuple[int, int]
    chunk: int | None
    n_keys: int = 6

    @property
    def id(self) -> str:
        sizes = f"{self.sizes[0]}+{self.sizes[1]}"
        return f"keys-{self.variant}-{self.mode}-{sizes}-chunk{self.chunk}-m{self.n_keys}"


def key_cases() -> list[KeyCase]:
    out = [
        KeyCase(variant, mode, sizes, chunk)
        for variant in ("out", "in", "npairs")
        for mode in ("labels", "simclr", "jaccard", "any")
        for sizes, chunk in (((4, 5), None), ((3, 6), 4))
    ]
    out += [KeyCase("out", "labels", (0, 5), None), KeyCase("in", "jaccard", (5, 0), 2, n_keys=0)]
    return out


def key_case_data(index: int, case: KeyCase):
    """(features [B, 2, 8], labels, keys [M, 8], key_labels, multilabel) of the full batch."""
    gen = torch.Generator().manual_seed(2000 + index)
    batch = sum(case.sizes)
    features = torch.randn(batch, 2, 8, generator=gen, dtype=torch.float64)
    keys = torch.nn.functional.normalize(
        torch.randn(case.n_keys, 8, generator=gen, dtype=torch.float64), dim=1
    )
    if case.mode == "simclr":
        return features, None, keys, None, None
    if case.mode == "labels":
        return (
            features,
            torch.randint(0, 4, (batch,), generator=gen),
            keys,
            torch.randint(0, 5, (case.n_keys,), generator=gen),
            None,
        )
    hot = torch.rand(batch, 4, generator=gen) < 0.35
    return features, hot, keys, torch.rand(case.n_keys, 4, generator=gen) < 0.35, case.mode


def run_key_cases(rank: int, results: dict) -> None:
    from supcon.losses.supcon import supcon_loss

    results["key_cases"] = {}
    for index, case in enumerate(key_cases()):
        features, labels, keys, key_labels, multilabel = key_case_data(index, case)
        start = sum(case.sizes[:rank])
        stop = start + case.sizes[rank]
        leaf = features[start:stop].clone().requires_grad_(True)
        loss = supcon_loss(
            leaf,
            None if labels is None else labels[start:stop],
            variant=case.variant,
            chunk_size=case.chunk,
            gather=True,
            keys=keys,
            key_labels=key_labels,
            multilabel=multilabel,
        )
        loss.backward()
        results["key_cases"][case.id] = (loss.detach(), leaf.grad)


# Rows each rank enqueues per step (rank 0, rank 1): uneven, empty, wrapping, and more than the queue.
QUEUE_STEPS = ((2, 1), (0, 3), (1, 0), (4, 4))


def queue_batch(step: int, rank: int, multi: bool):
    """The features [b, 3] and labels ([b] or [b, 4] multi-hot) rank ``rank`` enqueues at ``step``."""
    gen = torch.Generator().manual_seed(3000 + 10 * step + rank)
    b = QUEUE_STEPS[step][rank]
    labels = torch.rand(b, 4, generator=gen) < 0.5 if multi else torch.randint(0, 9, (b,), generator=gen)
    return torch.randn(b, 3, generator=gen), labels


def run_queue(rank: int, port: int, outdir: str) -> None:
    from launch import join_local_group

    join_local_group(rank, port, WORLD)
    from supcon.core import dist as sdist
    from supcon.losses.queue import LabelQueue

    sdist.set_strict("cpu")
    results = {}
    for multi in (False, True):
        queue = LabelQueue(5, 3, classes=4 if multi else None)
        states = []
        for step in range(len(QUEUE_STEPS)):
            queue.enqueue(*queue_batch(step, rank, multi))
            states.append(queue.state_dict())
        results["multi" if multi else "labels"] = states
    torch.save(results, os.path.join(outdir, f"queue_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
