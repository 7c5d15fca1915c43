"""Launch helpers for the tests that start processes on this machine (the command line of a local
torchrun and a free port are :func:`supcon.core.dist.local_command` and ``free_port``)."""

from __future__ import annotations

import datetime
import os


def spawn(fn, args: tuple, nprocs: int, timeout_s: float) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes; fail (not hang) past ``timeout_s``."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    # A hang (a collective that never matches) must fail the test, not block the suite.
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {nprocs} processes did not finish within {timeout_s} s")


def join_local_group(rank: int, port: int, world: int) -> None:
    """Join a gloo process group on 127.0.0.1 as one of ``world`` spawned test workers (one thread)."""
    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
