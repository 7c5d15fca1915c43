"""Small helpers for ``torch.distributed`` that are no-ops in a single process.

Every helper works without a process group (or with a world of one process), so code that calls
them runs unchanged on one device and under ``torchrun``. Tensors may have a different first
dimension on each rank: the gathers exchange the sizes, pad to the largest and trim again.

Strict mode (for tests): NCCL refuses tensors that are not on the rank's GPU and, like gloo, trusts
that every rank passes an ``all_gather`` or ``all_reduce`` tensor of the same shape and dtype (a
mismatch hangs or corrupts rather than failing). ``set_strict(device)``, or the environment variable
``SUPCON_STRICT_COLLECTIVES`` (``1``: the device of the process group's backend, CUDA for NCCL and
the CPU otherwise; any other value but ``0`` names the device), makes every collective of this
module check both first and raise :class:`CollectiveError` on every rank alike, so a CPU run under
gloo catches what would fail on GPUs. The check costs one extra small exchange per collective.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "CollectiveError",
    "all_gather_nograd",
    "all_gather_object",
    "all_gather_shapes",
    "barrier",
    "destroy",
    "init_from_env",
    "all_gather_sizes",
    "all_gather_with_grad",
    "all_reduce_sum",
    "is_dist",
    "is_main",
    "rank",
    "set_strict",
    "strict_device",
    "world_size",
]

STRICT_ENV = "SUPCON_STRICT_COLLECTIVES"


class CollectiveError(RuntimeError):
    """A collective that NCCL would refuse or that would hang: wrong device, shapes differing by rank."""


def is_dist() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group; 1 without a process group."""
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """This process's rank in the default group; 0 without a process group."""
    return dist.get_rank() if is_dist() else 0


def is_main() -> bool:
    """True on rank 0, the process that should log, print and write files."""
    return rank() == 0


# ----------------------------------------------------------------------------------------------
# Strict mode and the one place every collective goes through.

_UNSET = object()
_strict: object = _UNSET  # _UNSET: follow the environment; None: off; else the expected device


def set_strict(device: torch.device | str | None) -> None:
    """Check every collective against NCCL's rules, expecting tensors on ``device``; None: off.

    Overrides ``$SUPCON_STRICT_COLLECTIVES`` for this process.
    """
    global _strict
    _strict = None if device is None else torch.device(device)


def strict_device() -> torch.device | None:
    """The device strict mode expects collective tensors on, or None when strict mode is off."""
    if _strict is not _UNSET:
        return _strict
    value = os.environ.get(STRICT_ENV, "0").strip()
    if value in ("", "0"):
        return None
    if value == "1":
        return torch.device(_backend_device().type) if is_dist() else torch.device("cpu")
    return torch.device(value)


def _backend_device() -> torch.device:
    """Where the default group's backend takes tensors: this rank's GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on_device(t: torch.Tensor, want: torch.device) -> bool:
    return t.device.type == want.type and (want.index is None or t.device.index == want.index)


_MAX_DIMS = 8


def _signature(t: torch.Tensor | None, ok: bool) -> list[int]:
    """[ok, dtype code, ndim, dims padded with -1] of a collective's input: what every rank must share."""
    if t is None:
        return [int(ok), -1, -1] + [-1] * _MAX_DIMS
    code = zlib.crc32(str(t.dtype).encode())  # the same on every rank, unlike an order of first use
    dims = list(t.shape)[:_MAX_DIMS]
    return [int(ok), code, t.dim(), *dims, *([-1] * (_MAX_DIMS - len(dims)))]


def _check_collective(name: str, tensor: torch.Tensor | None, outputs: Sequence[torch.Tensor]) -> None:
    want = strict_device()
    if want is None:
        return
    bad = [t for t in (tensor, *outputs) if t is not None and not _on_device(t, want)]
    # Every rank takes part in the exchange, also one whose own tensors failed, so all raise together
    # instead of the others waiting in a collective this rank never joins.
    mine = torch.tensor(_signature(tensor, not bad), dtype=torch.long, device=_backend_device())
    parts = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(parts, mine)
    sigs = torch.stack(parts).tolist()
    if bad:
        devices = sorted({str(t.device) for t in bad})
        raise CollectiveError(f"{name}: tensors on {', '.join(devices)}, expected on {want} (strict mode)")
    failed = [r for r, s in enumerate(sigs) if not s[0]]
    if failed:
        raise CollectiveError(
            f"{name}: rank(s) {failed} passed tensors off their compute device (strict mode)"
        )
    if name in ("all_gather", "all_reduce") and any(s[1:] != sigs[0][1:] for s in sigs):
        shapes = [tuple(s[3 : 3 + s[2]]) for s in sigs]
        raise CollectiveError(
            f"{name}: the tensor differs between ranks (shapes by rank {shapes}, dtype codes "
            f"{[s[1] for s in sigs]}); every rank must pass the same shape and dtype (strict mode)"
        )


def _collective(name: str, tensor: torch.Tensor | None = None, outputs: Sequence[torch.Tensor] = ()):
    """Run one collective of the default group; every collective of this module goes through here."""
    _check_collective(name, tensor, outputs)
    if name == "all_gather":
        dist.all_gather(list(outputs), tensor)
    elif name == "all_reduce":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    elif name == "barrier":
        dist.barrier()
    else:
        raise ValueError(f"unknown collective {name!r}")


# ----------------------------------------------------------------------------------------------
# Tensor collectives.


def all_gather_shapes(values: Sequence[int], device: torch.device | str = "cpu") -> list[list[int]]:
    """The integers ``values`` (the same count on every rank) of every rank, in rank order.

    One exchange and one read of the result on the host, whatever the number of ranks.
    """
    values = [int(v) for v in values]
    if world_size() == 1:
        return [values]
    mine = torch.tensor(values, dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(world_size())]
    _collective("all_gather", mine, parts)
    return torch.stack(parts).tolist()


def all_gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """The value ``n`` of every rank, in rank order (``[n]`` in a single process)."""
    return [v[0] for v in all_gather_shapes([n], device)]


def _gather_padded(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Concatenate ``x`` of every rank along dim 0; ranks may hold different numbers of rows."""
    biggest = max(sizes)
    if biggest == 0:
        return x.new_empty((0, *x.shape[1:]))
    x = x.contiguous()
    # Collectives need equal shapes on every rank: pad to the largest, trim after.
    if x.shape[0] < biggest:
        x = torch.cat([x, x.new_zeros((biggest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    _collective("all_gather", x, parts)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def _check_sizes(x: torch.Tensor, sizes: Sequence[int] | None) -> list[int]:
    if sizes is None:
        return all_gather_sizes(x.shape[0], x.device)
    sizes = [int(s) for s in sizes]
    if len(sizes) != world_size() or sizes[rank()] != x.shape[0]:
        raise ValueError(
            f"sizes {sizes} do not match this rank ({rank()} of {world_size()}) holding {x.shape[0]} rows"
        )
    return sizes


def all_gather_nograd(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenation of ``x`` from all ranks along dim 0, in rank order, outside autograd.

    ``sizes`` (the first-dim size of every rank) saves one exchange when the caller knows them.
    """
    if world_size() == 1:
        return x.detach()
    with torch.no_grad():
        return _gather_padded(x.detach(), _check_sizes(x, sizes))


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes = sizes
        ctx.rank = rank()
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank computed the gradient of its own loss term with respect to all ranks'
        # rows; the sum over ranks is the gradient of the total, and each rank keeps its slice.
        grad = grad.contiguous().clone()
        _collective("all_reduce", grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenation of ``x`` from all ranks along dim 0, in rank order, differentiable.

    The backward sums the incoming gradient over all ranks (an all-reduce) and hands each rank
    the rows it contributed, so ``x`` receives the gradient of the sum of every rank's loss.
    Every rank must call backward through it (the all-reduce is a collective).
    """
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x, _check_sizes(x, sizes))


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all ranks, as a new tensor outside autograd (``x`` is left unchanged)."""
    out = x.detach().clone()
    if world_size() > 1:
        _collective("all_reduce", out)
    return out


# ----------------------------------------------------------------------------------------------
# Process groups and object collectives, for the trainer. ``torchrun`` sets the environment
# (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); supcon builds no launcher of its own.


def init_from_env(device: str = "auto", timeout_s: float | None = None) -> str:
    """Join the process group that ``torchrun`` describes in the environment; a no-op without one.

    The backend follows the device: NCCL on CUDA, gloo on the CPU. Each CUDA rank takes the GPU of its
    LOCAL_RANK. Collectives time out after ``timeout_s`` (default $SUPCON_DIST_TIMEOUT or 600 s), so a
    rank that dies ends the job with an error instead of a hang. Returns the device this rank uses.
    """
    import datetime

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or is_dist():
        return device
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    elif device == "auto":
        device = "cpu"
    timeout = timeout_s if timeout_s is not None else float(os.environ.get("SUPCON_DIST_TIMEOUT", "600"))
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout)
    )
    return device


def destroy() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        _collective("barrier")


def all_gather_object(obj):
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` in a single process."""
    if world_size() == 1:
        return [obj]
    # Objects travel pickled through torch's own tensors, which it puts on the right device; only the
    # agreement check of strict mode applies.
    _check_collective("all_gather_object", None, ())
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK); 0 without a process group."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_dist() else 0


@contextlib.contextmanager
def local_main_first():
    """Run the body on each machine's first process, then on the others (all ranks call it).

    For work that fills a per-machine cache (a download, a decode): the first process does it, the
    others then find it done. A no-op in one process.
    """
    first = local_rank() == 0
    if not first:
        barrier()
    yield
    if first:
        barrier()


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a process group on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_command(args: list[str], nproc: int = 1) -> list[str]:
    """The command line of ``supcon ARGS`` on this machine: one plain process, or ``torchrun`` with
    ``nproc`` processes on a free local port."""
    if nproc == 1:
        return [sys.executable, "-m", "supcon", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "supcon",
        *args,
    ]
