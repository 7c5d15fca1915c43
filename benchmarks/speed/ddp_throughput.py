"""Throughput (images/s) of SupCon pre-training with 1 process and with K processes under torchrun.

Each configuration runs ``supcon pretrain`` for a few epochs; the median epoch time after the first
gives images/s (samples x views / seconds). On the CPU the cores are shared out: one process uses
all of them as threads, K processes get cores/K threads each, so the figures compare the same
hardware. On CUDA each process takes one GPU, and peak GPU memory is reported too.

    python benchmarks/speed/ddp_throughput.py --data ../shared/data/cifar10-jpeg          # CPU, 1 vs 2
    python benchmarks/speed/ddp_throughput.py --data ... --encoder resnet18 --batch-size 1024 \\
        --views 2 --precision bf16 --nproc 1 --device cuda                           # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from supcon.core.dist import local_command

ROOT = Path(__file__).resolve().parents[2]


def run(nproc: int, args, work: Path) -> dict:
    out = work / f"n{nproc}"
    sup = [
        "pretrain",
        "--data",
        args.data,
        "--encoder",
        args.encoder,
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--precision",
        args.precision,
        "--device",
        args.device,
        "--quiet",
        "--out",
        str(out),
        "--set",
        f"pretrain.views={args.views}",
        "--set",
        f"pretrain.augment={args.augment}",
        "--set",
        f"model.width={args.width}",
    ]
    threads = max(1, (os.cpu_count() or 1) // nproc) if args.device == "cpu" else 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(local_command(sup, nproc), check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    secs = statistics.median(r["seconds"] for r in rows[1:]) if len(rows) > 1 else rows[0]["seconds"]
    n = json.loads((out / "results.json").read_text())["dataset"].split(" train")[0].split(": ")[1]
    return {
        "nproc": nproc,
        "threads": threads,
        "seconds": secs,
        "images_s": int(n) * args.views / secs,
        "peak_mem_gib": max((r.get("peak_mem_gib", 0.0) for r in rows), default=0.0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    ap.add_argument("--encoder", default="keras-cnn")
    ap.add_argument("--width", type=int, default=64, help="ResNet base width")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--augment", default="none")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, encoder {args.encoder}, global batch "
        f"{args.batch_size}, {args.views} view(s), precision {args.precision}, device {args.device}"
    )
    print(
        "\n| processes | threads each | s/epoch | images/s | peak GPU memory (GiB) |\n|---|---|---|---|---|"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nproc:
            r = run(n, args, Path(tmp))
            mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] else "-"
            print(f"| {n} | {r['threads']} | {r['seconds']:.2f} | {r['images_s']:.0f} | {mem} |", flush=True)


if __name__ == "__main__":
    main()
