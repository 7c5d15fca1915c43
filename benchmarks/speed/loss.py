"""Forward + backward time and peak memory of the SupCon loss against its peers.

    python benchmarks/speed/loss.py                       # N in {1024, 4096, 16384, 65536}, CPU (+ CUDA)
    python benchmarks/speed/loss.py --sizes 1024 4096 --repeats 5 --device cpu

Implementations (all L_out, temperature 0.1, D = 128, 2 views, labels from 10 classes):

- ``supcon dense``: ``supcon_loss(..., chunk_size=None)`` on the dense path (the default up to
  N = 8192 rows);
- ``supcon tiled``: ``supcon_loss(..., chunk_size=TILE_PAIRS // N)``, the memory-linear path (the
  default above N = 8192);
- ``pml``: pytorch-metric-learning's ``SupConLoss`` (``pip install pytorch-metric-learning``);
- ``textbook``: the dense formulation of the authors' code (N x N masks, logits minus the row max,
  exp, masked sums).

Memory: each (implementation, N) runs one forward + backward pass in a fresh child process. On
CUDA, ``torch.cuda.max_memory_allocated`` minus what was allocated before the pass; on CPU, the
peak resident set size of the child (``VmHWM``, reset through ``/proc/self/clear_refs`` once the
inputs exist) minus its resident size at that moment, with glibc told to return blocks of 128 KiB
and more to the system when freed (``MALLOC_MMAP_THRESHOLD_``), so the resident size follows live
memory. Both count everything the pass allocates (logits, saved tensors, the features' gradient),
not the inputs. A case whose memory, extrapolated as N^2 from the same implementation at the
largest size that ran (generous for the tiled path), exceeds the budget is reported as OOM without
running; a child that fails to allocate (its address space is capped at the budget) is OOM too.

Time: the implementations that fit run in one child per N, one warm-up pass each, then
``--repeats`` rounds in which each runs one forward + backward pass in turn; the table gives the
median. Interleaving spreads changes in the machine's load evenly over the implementations.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("supcon dense", "supcon tiled", "pml", "textbook")
TEMPERATURE = 0.1
CLASSES = 10
GIB = 1 << 30


# ---------------------------------------------------------------------------------------------
# The implementations (imported in the child only)
# ---------------------------------------------------------------------------------------------


def textbook_supcon(features, labels, temperature=TEMPERATURE):
    """Dense L_out as the authors' code writes it, with anchors without positives left out."""
    import torch
    import torch.nn.functional as F

    batch, views, _ = features.shape
    z = F.normalize(torch.cat(torch.unbind(features, dim=1)), dim=1)
    mask = (labels[:, None] == labels[None, :]).float().repeat(views, views)
    logits_mask = 1 - torch.eye(batch * views, device=features.device)
    mask = mask * logits_mask
    logits = z @ z.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    positives = mask.sum(1)
    valid = positives > 0
    mean_log_prob_pos = (mask * log_prob).sum(1)[valid] / positives[valid]
    return -mean_log_prob_pos.mean()


def make_loss(method: str, n: int):
    import torch

    if method in ("supcon dense", "supcon tiled"):
        from supcon.losses.supcon import TILE_PAIRS, supcon_loss

        # chunk_size=None is the dense path at every size here: DENSE_MAX_PAIRS is only consulted
        # for the automatic choice, so force dense by raising the limit for this process.
        if method == "supcon dense":
            import supcon.losses.supcon as loss_mod

            loss_mod.DENSE_MAX_PAIRS = 1 << 62
            return lambda f, y: supcon_loss(f, y, temperature=TEMPERATURE)
        chunk = max(1, TILE_PAIRS // n)
        return lambda f, y: supcon_loss(f, y, temperature=TEMPERATURE, chunk_size=chunk)
    if method == "pml":
        from pytorch_metric_learning.losses import SupConLoss

        pml_loss = SupConLoss(temperature=TEMPERATURE)

        def run(f, y):
            return pml_loss(torch.cat(torch.unbind(f, dim=1)), y.repeat(f.shape[1]))

        return run
    if method == "textbook":
        return textbook_supcon
    raise ValueError(method)


# ---------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _inputs(n: int, views: int, dim: int, device: str):
    import torch

    gen = torch.Generator().manual_seed(0)
    batch = n // views
    base = torch.randn(batch, views, dim, generator=gen).to(device)
    labels = torch.randint(0, CLASSES, (batch,), generator=gen).to(device)
    return base, labels


def _step(loss_fn, base, labels, device: str) -> float:
    import torch

    f = base.clone().requires_grad_(True)
    loss = loss_fn(f, labels)
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return float(loss.detach())


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "memory" in str(exc).lower()


def child_memory(method: str, n: int, views: int, dim: int, device: str, mem_limit: int) -> dict:
    """Peak extra memory of one forward + backward pass, in a process of its own."""
    import torch

    base, labels = _inputs(n, views, dim, device)
    try:
        loss_fn = make_loss(method, n)
    except ImportError as exc:
        return {"status": "not installed", "detail": f"no module {exc.name}"}
    if device == "cpu" and mem_limit > 0:
        # A safety net under the prediction: an allocation beyond the limit fails in this child
        # (reported as OOM) instead of pushing the machine into the kernel's OOM killer.
        vm = _rss_kib("VmSize") * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + mem_limit, vm + mem_limit))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        exact = _reset_cpu_peak()  # without it, the peak since start-up: still an upper bound
        before = _rss_kib("VmRSS") * 1024
    try:
        value = _step(loss_fn, base, labels, device)
    except (RuntimeError, MemoryError) as exc:
        if _is_oom(exc):
            return {"status": "OOM", "detail": str(exc).splitlines()[0][:120]}
        raise
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = (_rss_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        peak -= before
    return {"status": "ok", "peak_bytes": peak, "loss": value}


def child_time(methods: list[str], n: int, views: int, dim: int, device: str, repeats: int) -> dict:
    """Forward + backward times of several implementations, interleaved round by round.

    Interleaving spreads any change in the machine's load evenly over the implementations.
    """
    base, labels = _inputs(n, views, dim, device)
    fns = {m: make_loss(m, n) for m in methods}
    for fn in fns.values():  # warm-up
        _step(fn, base, labels, device)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):
        for m, fn in fns.items():
            t0 = time.perf_counter()
            _step(fn, base, labels, device)
            times[m].append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------
# Parent: the table
# ---------------------------------------------------------------------------------------------


def available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _run_child(args: list[str], threads: int) -> tuple[dict | None, str]:
    # glibc returns blocks of 128 KiB and more to the system when freed, so the resident size
    # follows the live memory instead of keeping freed buffers.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(
        [sys.executable, __file__, "--threads", str(threads), *args], capture_output=True, text=True, env=env
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        if proc.returncode < 0 or proc.returncode == 137:
            tail = f"killed ({tail})"
        return None, tail[:200]
    return json.loads(lines[-1]), ""


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_bytes(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB / 4 else f"{b / (1 << 20):.0f} MiB"


def bench_device(device: str, args) -> None:
    import torch

    if device == "cuda":
        budget = int(torch.cuda.mem_get_info()[0] * 0.9)
        name = torch.cuda.get_device_name()
    else:
        budget = int(available_bytes() * args.mem_fraction)
        name = f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"\n### {device}: {name}; torch {torch.__version__}; D = {args.dim}, {args.views} views")
    print(f"median of {args.repeats} interleaved passes; memory budget per case {fmt_bytes(budget)}\n")
    print("| N | implementation | fwd+bwd (median) | vs supcon | peak extra memory | loss |")
    print("|---:|---|---:|---:|---:|---:|")
    largest: dict[str, tuple[int, int]] = {}
    common = [str(args.views), str(args.dim), device]
    for n in sorted(args.sizes):
        rows: dict[str, dict] = {}
        for method in args.methods:
            if method in largest:
                n0, peak0 = largest[method]
                predicted = peak0 * (n / n0) ** 2
                if predicted > budget:
                    rows[method] = {"status": "OOM", "detail": f"predicted {fmt_bytes(predicted)}"}
                    continue
            res, err = _run_child(["--child-memory", method, str(n), *common, str(budget)], args.threads)
            if res is None:
                res = {
                    "status": "OOM" if "memory" in err.lower() or "killed" in err else "failed",
                    "detail": err,
                }
            rows[method] = res
            if res["status"] == "ok":
                largest[method] = (n, res["peak_bytes"])
        ok = [m for m, r in rows.items() if r["status"] == "ok"]
        if ok:
            times, err = _run_child(
                ["--child-time", ",".join(ok), str(n), *common, str(args.repeats)], args.threads
            )
            for m in ok:
                if times is None:
                    rows[m] = {"status": "failed", "detail": err}
                else:
                    rows[m]["time_s"] = statistics.median(times[m])
        ours = [r["time_s"] for m, r in rows.items() if m.startswith("supcon") and "time_s" in r]
        best = min(ours, default=None)
        for method, res in rows.items():
            if "time_s" in res:
                ratio = f"{res['time_s'] / best:.2f}x" if best else ""
                cells = [fmt_time(res["time_s"]), ratio, fmt_bytes(res["peak_bytes"]), f"{res['loss']:.4f}"]
            else:
                cells = [res["status"], "", res.get("detail", ""), ""]
            print(f"| {n} | {method} | " + " | ".join(cells) + " |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536], help="N = B * V")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per case (median)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cpu, and cuda when present)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument(
        "--mem-fraction", type=float, default=0.7, help="share of the available memory a case may use (CPU)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--child-memory", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--child-time", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        method, n, views, dim, device, limit = args.child_memory
        print(json.dumps(child_memory(method, int(n), int(views), int(dim), device, int(limit))))
        return 0
    if args.child_time:
        methods, n, views, dim, device, repeats = args.child_time
        print(json.dumps(child_time(methods.split(","), int(n), int(views), int(dim), device, int(repeats))))
        return 0

    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            continue
        bench_device(device, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
