"""One rank of tests/test_strict_collectives.py: strict mode under gloo, two processes on the CPU.

Each check records the error text (or None) on this rank, so the parent sees that every rank
raised alike (none left waiting in a collective) and that correct use passed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

WORLD = 2


def _outcome(fn) -> str | None:
    from supcon.core.dist import CollectiveError

    try:
        fn()
    except CollectiveError as e:
        return str(e)
    return None


def run(rank: int, port: int, outdir: str) -> None:
    from launch import join_local_group

    os.environ["SUPCON_STRICT_COLLECTIVES"] = "1"  # the backend's device: the CPU under gloo
    join_local_group(rank, port, WORLD)
    from supcon.core import dist as sdist
    from supcon.losses.supcon import supcon_loss

    out: dict = {"env_device": str(sdist.strict_device())}
    # Rows of a different width on each rank: a gather NCCL would run with mismatched buffers.
    wide = torch.ones(2, 3 + rank)
    out["uneven_gather"] = _outcome(lambda: sdist.all_gather_nograd(wide, sizes=[2, 2]))
    out["uneven_reduce"] = _outcome(lambda: sdist.all_reduce_sum(torch.ones(1 + rank)))
    out["dtype_reduce"] = _outcome(
        lambda: sdist.all_reduce_sum(torch.ones(2, dtype=torch.float32 if rank else torch.float64))
    )
    # The loss with a different feature size per rank fails on every rank alike, before any gather.
    try:
        supcon_loss(torch.randn(3, 2, 4 + rank), gather=True)
        out["loss_dims"] = None
    except ValueError as e:
        out["loss_dims"] = str(e)
    # Pretending the compute device is a GPU: CPU tensors are what NCCL would refuse. Only rank 0
    # expects the GPU, so only it sees bad tensors; rank 1 must raise too instead of waiting.
    sdist.set_strict("cuda" if rank == 0 else "cpu")
    out["wrong_device_one_rank"] = _outcome(lambda: sdist.all_gather_sizes(5))
    sdist.set_strict("cuda")
    out["wrong_device"] = _outcome(lambda: sdist.all_reduce_sum(torch.ones(2)))
    # Correct use passes, and the group still works after the refused calls.
    sdist.set_strict("cpu")
    x = torch.arange(3.0 * (rank + 1)).reshape(rank + 1, 3).requires_grad_(True)
    gathered = sdist.all_gather_with_grad(x)
    gathered.sum().backward()
    out["ok"] = {
        "gathered": gathered.detach(),
        "grad": x.grad,
        "sizes": sdist.all_gather_sizes(10 + rank),
        "objects": sdist.all_gather_object({"rank": rank}),
        "sum": sdist.all_reduce_sum(torch.tensor([1.0])),
    }
    sdist.barrier()
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()
