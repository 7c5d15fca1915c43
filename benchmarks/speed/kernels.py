"""The fused CPU kernels (``supcon.models.kernels``) against PyTorch's own ops, in one process.

    python benchmarks/speed/kernels.py [--batch 256] [--rounds 5]

Prints milliseconds (median over interleaved rounds) for the Keras example CNN's first layer
(conv 3x3 -> max-pool 2 -> ReLU, forward and backward), its second pooling, its second layer in
float32 (Winograd conv 3x3 -> max-pool 2 -> ReLU against oneDNN's convolution and PyTorch's
pooling), and a whole SupCon training step of the Keras example's CNN (batch of CIFAR-sized random
images, ``precision: auto`` as a run resolves it, Adam), each with the kernels and with PyTorch's
ops, and the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from supcon.core.runtime import resolve_runtime, tune_cpu
from supcon.losses.supcon import supcon_loss
from supcon.models import keras_cnn as encoders
from supcon.models import kernels


def plain_pool(x):
    return F.max_pool2d(x, 2).relu_()


def plain_conv_pool(x, conv):
    return plain_pool(conv(x))


def time_fn(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20, help="calls per round")
    args = ap.parse_args()
    rt = resolve_runtime("cpu", "auto", True)
    tune_cpu()  # as the command line does for training
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rt.describe()}")
    print(f"kernels: {kernels.kernel_status()}")
    if kernels._library() is None:
        return
    n = args.batch
    torch.manual_seed(0)
    conv1 = torch.nn.Conv2d(3, 32, 3)
    images = torch.rand(n, 32, 32, 3).permute(0, 3, 1, 2)[:, :, :30, :30]  # NHWC memory, cropped
    g1 = torch.randn(n, 32, 14, 14).bfloat16().contiguous(memory_format=torch.channels_last)
    act2 = torch.randn(n, 64, 12, 12).bfloat16().contiguous(memory_format=torch.channels_last)
    g2 = torch.randn(n, 64, 6, 6).bfloat16().contiguous(memory_format=torch.channels_last)
    conv2 = torch.nn.Conv2d(32, 64, 3)
    x2 = torch.randn(n, 32, 14, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    g3 = torch.randn(n, 64, 6, 6).contiguous(memory_format=torch.channels_last)

    def layer1(fn, backward):
        def run():
            with rt.autocast():
                y = fn(images, conv1)
            if backward:
                y.backward(g1)

        return run

    def pool2(fn, backward):
        x = act2.clone().requires_grad_(backward)

        def run():
            y = fn(x)
            if backward:
                y.backward(g2)

        return run

    def layer2(fn):
        def run():
            fn(x2, conv2).backward(g3)

        return run

    enc = {name: encoders.KerasCNN().to(memory_format=torch.channels_last) for name in ("fused", "plain")}
    opt = {name: torch.optim.Adam(m.parameters(), eps=1e-7) for name, m in enc.items()}
    batch = torch.rand(n, 32, 32, 3).permute(0, 3, 1, 2)
    labels = torch.randint(0, 10, (n,))

    def train_step(name):
        def run():
            with rt.autocast():
                z = enc[name](batch)
            loss = supcon_loss(z.float().unsqueeze(1), labels, temperature=0.05, variant="npairs")
            opt[name].zero_grad(set_to_none=True)
            loss.backward()
            opt[name].step()

        return run

    cases = {
        "conv1 + pool + ReLU, forward": (
            layer1(kernels.conv3x3_pool2_relu, False),
            layer1(plain_conv_pool, False),
        ),
        "conv1 + pool + ReLU, fwd + bwd": (
            layer1(kernels.conv3x3_pool2_relu, True),
            layer1(plain_conv_pool, True),
        ),
        "pool + ReLU after conv2, fwd + bwd": (pool2(kernels.max_pool2_relu, True), pool2(plain_pool, True)),
        "conv2 + pool + ReLU in float32, fwd + bwd": (
            layer2(kernels.winograd_conv3x3_pool2_relu),
            layer2(plain_conv_pool),
        ),
        "SupCon training step (Keras example CNN)": (train_step("fused"), train_step("plain")),
    }
    # The encoder calls these two module-level names (conv2's falls back to the fused pooling, or
    # PyTorch's, under autocast): the step swaps them for the variant being timed.
    kernel_fns = (encoders.conv3x3_pool2_relu, encoders.winograd_conv3x3_pool2_relu)
    torch_fns = (plain_conv_pool, plain_conv_pool)
    print(f"\nbatch {n}, median of {args.rounds} interleaved rounds of {args.reps} calls\n")
    print("| what | supcon kernels | PyTorch ops | speed-up |")
    print("|---|---|---|---|")
    for what, (fused, plain) in cases.items():
        times = {"fused": [], "plain": []}
        for _ in range(args.rounds):
            for name, fn in (("fused", fused), ("plain", plain)):
                encoders.conv3x3_pool2_relu, encoders.winograd_conv3x3_pool2_relu = (
                    kernel_fns if name == "fused" else torch_fns
                )
                times[name].append(time_fn(fn, args.reps))
        encoders.conv3x3_pool2_relu, encoders.winograd_conv3x3_pool2_relu = kernel_fns
        f, p = statistics.median(times["fused"]), statistics.median(times["plain"])
        print(f"| {what} | {f:.2f} ms | {p:.2f} ms | {p / f:.2f}x |")


if __name__ == "__main__":
    main()
