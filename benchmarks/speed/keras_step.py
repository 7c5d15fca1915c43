"""Where a training step of the Keras example goes on the CPU: per-op times against the FLOP floor.

    python benchmarks/speed/keras_step.py                        # both steps, this CPU's own ISA
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/speed/keras_step.py
                                                                 # as on an AVX2-only CPU (no bf16)
    python benchmarks/speed/keras_step.py --profile prof.txt     # torch.profiler tables too

Builds the ``keras-example`` preset's models from the library (encoder, dropout-dense classifier,
npairs loss, fused Adam), applies the command line's process-wide CPU settings, and times
``--steps`` steps of ``--batch`` random CIFAR-shaped uint8 images after ``--warmup`` untimed ones:
the cross-entropy step and the SupCon pre-training step. ``precision: auto`` decides bf16 or fp32
as a run would. The floor is the step's FLOPs (network forward and backward, counted by
``torch.utils.flop_counter``) at ``--peak`` GFLOP/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from supcon.core.config import load_preset
from supcon.core.runtime import resolve_runtime, tune_cpu
from supcon.data.dataset import ImageDataset
from supcon.losses.supcon import supcon_loss
from supcon.models.build import build_classifier, build_contrastive
from supcon.models.kernels import kernel_status
from supcon.train.optim import build_optimizer


def make_steps(batch: int, rt):
    cfg = load_preset("keras-example")
    x = torch.zeros(batch, 32, 32, 3, dtype=torch.uint8)
    data = ImageDataset(
        "cifar-shaped", x, torch.zeros(batch, dtype=torch.long), x, x[:0, 0, 0, 0], list("0123456789")
    )
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    torch.manual_seed(0)
    clf = build_classifier(cfg, data).to(memory_format=torch.channels_last).train()
    con = build_contrastive(cfg, data).to(memory_format=torch.channels_last).train()
    opts = {
        name: build_optimizer(m.parameters(), "adam", lr=1e-3, eps=1e-7)
        for name, m in (("ce", clf), ("supcon", con))
    }

    def ce():
        with rt.autocast():
            logits = clf(rt.images(images))
        loss = F.cross_entropy(logits.float(), labels)
        opts["ce"].zero_grad(set_to_none=True)
        loss.backward()
        opts["ce"].step()

    def pretrain():
        with rt.autocast():
            z = con(rt.images(images))
        loss = supcon_loss(z.float().unsqueeze(1), labels, temperature=0.05, variant="npairs")
        opts["supcon"].zero_grad(set_to_none=True)
        loss.backward()
        opts["supcon"].step()

    return {"ce": (ce, clf), "supcon": (pretrain, con)}, images, rt


def network_flops(model, images, rt) -> int:
    """The network's FLOPs as PyTorch's own ops compute it (direct convolutions): the C kernels are
    switched off while counting, as the counter cannot see inside them."""
    from supcon.models import kernels

    real, kernels._library = kernels._library, lambda: None
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            with rt.autocast():
                out = model(rt.images(images))
            out.float().sum().backward()
    finally:
        kernels._library = real
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def time_steps(step, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def profile_table(step, steps: int, path: str, name: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50)
    with open(path, "a") as f:
        f.write(f"\n## {name} ({steps} steps)\n{table}\n")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--peak", type=float, default=None, help="the CPU's peak GFLOP/s (default: not shown)")
    ap.add_argument("--profile", default=None, help="append torch.profiler tables to this file")
    ap.add_argument("--profile-steps", type=int, default=5)
    args = ap.parse_args()
    tune_cpu()
    rt = resolve_runtime("cpu", args.precision, channels_last=True)
    steps, images, rt = make_steps(args.batch, rt)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"ISA {torch.backends.cpu.get_cpu_capability()}, {rt.describe()}, kernels: {kernel_status()}"
    )
    print(
        "\n| step | ms/step (median) | min | network GFLOP | GFLOP/s |" + (" floor ms |" if args.peak else "")
    )
    print("|---|---:|---:|---:|---:|" + ("---:|" if args.peak else ""))
    for name, (step, model) in steps.items():
        flops = network_flops(model, images, rt)
        times = time_steps(step, args.steps, args.warmup)
        med = statistics.median(times)
        cells = [
            name,
            f"{1e3 * med:.1f}",
            f"{1e3 * min(times):.1f}",
            f"{flops / 1e9:.2f}",
            f"{flops / med / 1e9:.0f}",
        ]
        if args.peak:
            cells.append(f"{1e3 * flops / (args.peak * 1e9):.1f}")
        print("| " + " | ".join(cells) + " |", flush=True)
        if args.profile:
            table = profile_table(step, args.profile_steps, args.profile, name)
            print("\n".join(table.splitlines()[:22]))


if __name__ == "__main__":
    main()
