"""Search for shapes where oneDNN's 1x1-convolution backward crashes the process (bf16 autocast or fp32).

Findings and the guard: docs/onednn-bf16-crash.md (on an AVX2 CPU the float32 weight gradient of a
stride-2 channels-last 1x1 convolution with 2-7 input channels corrupts the heap).

Each candidate runs in a child process (several per child; a crash ends the child, and the parent
records the candidate it was on and starts a new child at the next one), so a segfault or a heap
abort becomes one row of the table instead of ending the search:

    OMP_NUM_THREADS=1 python benchmarks/repro/onednn_bf16_crash.py            # 1x1 convolutions, bf16
    OMP_NUM_THREADS=1 python benchmarks/repro/onednn_bf16_crash.py --dtype fp32 --malloc-check
    python benchmarks/repro/onednn_bf16_crash.py --threads 2 --malloc-check   # glibc heap checks on
    python benchmarks/repro/onednn_bf16_crash.py --model                      # CIFAR ResNet-18, small widths

A 1x1 candidate is ``conv2d(x, w, stride)`` with x [batch, cin, size, size] and w [2*cin, cin, 1, 1]
(the shape of a ResNet shortcut), forward and backward under ``torch.autocast('cpu', torch.bfloat16)``
(or in float32 with ``--dtype fp32``), in NCHW or channels-last. Only PyTorch is used, except
``--model`` and ``--runtime``, which use supcon's ResNet and runtime settings.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import subprocess
import sys


def candidates(model: bool) -> list[tuple]:
    if model:
        return [(w, b, s, cl) for w in range(1, 9) for b in range(1, 8) for s in (8, 16, 32) for cl in (0, 1)]
    chans = sorted({w * m for w in range(1, 9) for m in (1, 2, 4)})
    sizes = (4, 5, 7, 8, 9, 16, 17, 32)
    return list(itertools.product(chans, range(1, 8), sizes, (1, 2), (0, 1)))


def child(model: bool, start: int, threads: int, runtime: bool, bf16: bool) -> None:
    import torch
    from torch.nn import functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if runtime:
        from supcon.core.runtime import keep_freed_memory

        torch.set_flush_denormal(True)
        keep_freed_memory()
    for i, cand in enumerate(candidates(model)[start:], start):
        print(f"start {i}", flush=True)
        if model:
            from supcon.models.resnet import resnet18

            w, b, s, cl = cand
            m = resnet18(width=w)
            opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
            if cl:
                m = m.to(memory_format=torch.channels_last)
            # As in training: full batches, then an odd last batch (two views of it for SupCon).
            for n in (32, 32, b, 2 * b, b):
                x = torch.randn(n, 3, s, s)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    y = m(x)
                opt.zero_grad()
                y.float().square().sum().backward()
                opt.step()
        else:
            c, b, s, stride, cl = cand
            x = torch.randn(b, c, s, s)
            wt = torch.randn(2 * c, c, 1, 1)
            if cl:
                x, wt = (
                    x.contiguous(memory_format=torch.channels_last),
                    wt.contiguous(memory_format=torch.channels_last),
                )
            x.requires_grad_(), wt.requires_grad_()
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                y = F.conv2d(x, wt, stride=stride)
            y.float().square().sum().backward()
            assert torch.isfinite(x.grad).all() and torch.isfinite(wt.grad).all(), "non-finite gradient"
        print(f"ok {i}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="store_true", help="whole ResNet-18 models instead of single 1x1 convs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--dtype", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast or plain float32"
    )
    ap.add_argument("--malloc-check", action="store_true", help="MALLOC_CHECK_=3: abort on heap corruption")
    ap.add_argument(
        "--runtime", action="store_true", help="as supcon's CPU runtime: flush denormals, malloc kept"
    )
    ap.add_argument("--valgrind", action="store_true", help="run the children under valgrind (slow)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.model, args.child, args.threads, args.runtime, args.dtype == "bf16")
        return
    import torch

    cands = candidates(args.model)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.malloc_check:
        env["MALLOC_CHECK_"] = "3"
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--dtype", args.dtype]
    cmd += (["--model"] if args.model else []) + (["--runtime"] if args.runtime else [])
    if args.valgrind:
        cmd = ["valgrind", "-q", "--error-exitcode=99", *cmd]
    onednn = [ln.strip() for ln in torch.__config__.show().splitlines() if "MKL-DNN" in ln or "oneDNN" in ln]
    print(f"torch {torch.__version__}; {onednn[0] if onednn else 'oneDNN version unknown'}")
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{len(cands)} candidates; {args.dtype}; threads {args.threads}; malloc check {args.malloc_check}")
    head = "width batch size channels_last" if args.model else "cin batch size stride channels_last"
    print(f"{head} -> result")
    results: dict[int, str] = {}
    start = 0
    while start < len(cands):
        proc = subprocess.run([*cmd, "--child", str(start)], env=env, capture_output=True, text=True)
        lines = proc.stdout.split()
        done = {int(lines[k + 1]) for k in range(0, len(lines) - 1, 2) if lines[k] == "ok"}
        for i in done:
            results[i] = "ok"
        started = [int(lines[k + 1]) for k in range(0, len(lines) - 1, 2) if lines[k] == "start"]
        if proc.returncode == 0:
            break
        last = started[-1] if started else start
        rc = proc.returncode
        why = (
            f"crash ({signal.Signals(-rc).name})"
            if rc < 0
            else f"exit {rc}: {proc.stderr.strip().splitlines()[-1:]}"
        )
        results[last] = why
        print(" ".join(map(str, cands[last])), "->", why, flush=True)
        start = last + 1
    bad = {i: r for i, r in results.items() if r != "ok"}
    print(f"{len(cands) - len(bad)} ok, {len(bad)} failed")


if __name__ == "__main__":
    main()
