"""Throughput of SupCon and cross-entropy training steps on one GPU, from the library's pieces alone.

    python benchmarks/speed/gpu.py                           # ResNet-18 and -50, batch 1024, H100/H200
    python benchmarks/speed/gpu.py --models resnet18 --steps 50 --compile --json gpu.json
    python benchmarks/speed/gpu.py --device cpu --steps 2 --batch-size 16 --width 8   # smoke test
    python benchmarks/speed/gpu.py --models resnet50 --losses supcon --profile prof.txt  # where the time goes

Each configuration trains on CIFAR-10-shaped uint8 images held on the device (random ones, or
``--data PATH``, an image folder or CIFAR copy read by ``supcon.data.datasets.load_dataset``):

- ``supcon``: ``BatchAugment`` makes ``--views`` views of the batch on the device, the CIFAR ResNet
  (``supcon.models.encoders.build_encoder``) and an MLP ``ProjectionHead`` embed them, ``supcon_loss`` with
  the labels, SGD;
- ``ce``: one augmented view, the same encoder with a linear classifier, cross-entropy, SGD.

bf16 autocast (``--precision``; float32 by default on the CPU, where bf16 convolutions without
hardware support are emulated and take minutes), channels_last, ``--warmup`` untimed steps then
``--steps`` timed ones. Step time is the wall time of the timed steps over their number (with
``torch.cuda.synchronize`` at both ends).
CUDA events around the model's forward and backward give the share of the step spent outside the
model (augmentation, loss, optimizer, launch gaps). Model FLOPs of one step are counted with
``torch.utils.flop_counter.FlopCounterMode`` (forward and backward of the network, not the loss);
MFU = FLOPs / step time / ``--peak-flops`` (default 989e12, H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from supcon.data.augment import AugmentConfig, BatchAugment, split_views
from supcon.losses.supcon import supcon_loss
from supcon.models.encoders import build_encoder
from supcon.models.heads import ProjectionHead


@dataclass
class Data:
    x: torch.Tensor  # uint8 [N, H, W, C] on the device
    y: torch.Tensor  # int64 [N] on the device
    classes: int


def load_data(args, device: torch.device) -> Data:
    if args.data:
        from supcon.data.datasets import load_dataset

        ds = load_dataset(path=args.data)
        return Data(ds.train_x.to(device), ds.train_y.to(device), ds.num_classes)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (args.samples, 32, 32, 3), dtype=torch.uint8, device=device, generator=g)
    y = torch.randint(0, 10, (args.samples,), device=device, generator=g)
    return Data(x, y, 10)


class Clock:
    """Time marks: CUDA events on a GPU (read after one synchronize), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


def build(kind: str, name: str, args, classes: int, device: torch.device):
    torch.manual_seed(0)
    encoder = build_encoder(name, width=args.width)
    if kind == "supcon":
        head: nn.Module = ProjectionHead(encoder.feature_dim, 128, batch_norm=True)
    else:
        head = nn.Linear(encoder.feature_dim, classes)
    model = nn.Sequential(encoder, head).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    return model, opt


def autocast_for(device: torch.device, precision: str):
    """Autocast to bf16 or fp16 (speed only: no loss scaling here), or a no-op for fp32."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def make_step(kind: str, model, run_model, opt, data: Data, args, device: torch.device, clock: Clock):
    """One training step; returns its time marks (start, model in, model out, backward in, out, end)."""
    views = args.views if kind == "supcon" else 1
    aug = BatchAugment(AugmentConfig())
    g = torch.Generator(device=device).manual_seed(1)
    autocast = autocast_for(device, args.precision)

    def step():
        t0 = clock.mark()
        idx = torch.randint(0, data.x.shape[0], (args.batch_size,), device=device, generator=g)
        x = aug(data.x[idx], views=views, generator=g)
        y = data.y[idx]
        t1 = clock.mark()
        with autocast:
            out = run_model(x)
        t2 = clock.mark()
        if kind == "supcon":
            loss = supcon_loss(split_views(out.float(), views), y, temperature=args.temperature)
        else:
            loss = F.cross_entropy(out.float(), y)
        t3 = clock.mark()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t4 = clock.mark()
        opt.step()
        t5 = clock.mark()
        return t0, t1, t2, t3, t4, t5

    return step


def count_model_flops(model, kind: str, args, device: torch.device) -> int:
    """FLOPs of the network's forward and backward on one step's input (the loss left out)."""
    views = args.views if kind == "supcon" else 1
    x = torch.rand(views * args.batch_size, 3, 32, 32, device=device).contiguous(
        memory_format=torch.channels_last
    )
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast_for(device, args.precision):
            out = model(x)
        out.float().backward(torch.ones_like(out, dtype=torch.float32))
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_steps(step, args, device: torch.device, path: str) -> None:
    """``--profile``: a few more steps under torch.profiler; the ops by device (or CPU) time go to
    ``path`` and the top of the table to stdout, under the configuration's heading."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60)
    with open(path, "a") as f:
        f.write(f"\n## {args.current} ({args.profile_steps} steps)\n{table}\n")
    print(f"\nprofile {args.current}, {args.profile_steps} steps, sorted by {key}:")
    print("\n".join(table.splitlines()[:18]), flush=True)


def bench(kind: str, name: str, data: Data, args, device: torch.device) -> dict:
    model, opt = build(kind, name, args, data.classes, device)
    flops = count_model_flops(model, kind, args, device)
    run_model = torch.compile(model) if args.compile else model
    clock = Clock(device)
    step = make_step(kind, model, run_model, opt, data, args, device, clock)
    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    marks = [step() for _ in range(args.steps)]
    sync(device)
    step_s = (time.perf_counter() - t0) / args.steps
    total = sum(clock.seconds(m[0], m[5]) for m in marks)
    in_model = sum(clock.seconds(m[1], m[2]) + clock.seconds(m[3], m[4]) for m in marks)
    views = args.views if kind == "supcon" else 1
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if args.profile:
        args.current = f"{name} {kind}" + (" compiled" if args.compile else "")
        profile_steps(step, args, device, args.profile)
    del model, opt, run_model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "model": name,
        "loss": kind,
        "batch": args.batch_size,
        "views": views,
        "images_s": views * args.batch_size / step_s,
        "ms_step": 1e3 * step_s,
        "peak_mem_gib": peak_mem,
        "model_tflop_step": flops / 1e12,
        "mfu": flops / step_s / args.peak_flops,
        "outside_model": 1 - in_model / total if total > 0 else None,
    }


def print_table(rows: list[dict]) -> None:
    print(
        "\n| model | loss | batch x views | images/s | ms/step | peak memory GiB | model TFLOP/step | MFU"
        " | step outside the model |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        out = "-" if r["outside_model"] is None else f"{100 * r['outside_model']:.1f}%"
        cells = [
            r["model"],
            r["loss"],
            f"{r['batch']} x {r['views']}",
            f"{r['images_s']:,.0f}",
            f"{r['ms_step']:.1f}",
            mem,
            f"{r['model_tflop_step']:.3f}",
            f"{100 * r['mfu']:.1f}%",
            out,
        ]
        print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--losses", nargs="+", default=["supcon", "ce"], choices=["supcon", "ce"])
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5, 1 on CPU)")
    ap.add_argument("--width", type=int, default=64, help="ResNet base width (64: the standard networks)")
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--samples", type=int, default=50_000, help="random images held on the device")
    ap.add_argument("--data", default=None, help="an image folder or CIFAR copy instead of random images")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network")
    ap.add_argument(
        "--precision", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16, fp32 on CPU"
    )
    ap.add_argument("--peak-flops", type=float, default=989e12, help="the device's peak bf16 FLOP/s")
    ap.add_argument("--json", default=None, help="also write the table to this JSON file")
    ap.add_argument("--profile", default=None, help="append torch.profiler op tables to this file")
    ap.add_argument("--profile-steps", type=int, default=5, help="steps profiled per configuration")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.warmup is None:
        args.warmup = 5 if device.type == "cuda" else 1
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {name}, {args.precision}, {args.steps} timed steps after {args.warmup}",
        flush=True,
    )
    data = load_data(args, device)
    rows = [bench(kind, m, data, args, device) for m in args.models for kind in args.losses]
    print_table(rows)
    if args.json:
        meta = {"torch": torch.__version__, "device": name, "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
