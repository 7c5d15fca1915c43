"""Throughput of the 2-view SupCon augmentation on CPU, and its share of a training step.

    python benchmarks/speed/augment.py                         # batches 256 and 512, 32x32, 2 views
    python benchmarks/speed/augment.py --batch-sizes 512 --repeats 20 --no-step

Pipelines (each: uint8 [B, 32, 32, 3] in, two views of every image out, float32 normalised):

- ``supcon matmul``: ``BatchAugment()``, the default: crop + resize + flip as two batched matrix
  products with per-sample interpolation matrices;
- ``supcon grid_sample``: the same with the crop through affine grids and ``F.grid_sample``
  (``GridSampleAugment`` below; no antialiasing, and edge pixels blend with neighbours just outside
  the crop box), the alternative the library's matmul crop was chosen over: on one CPU thread the
  crop of 1024 32x32 images took 15 ms with matmul and 18 ms with grid_sample; they tie at 96x96,
  and at 224x224 grid_sample takes about half the time;
- ``kornia``: ``RandomResizedCrop(scale=(0.2, 1)) -> RandomHorizontalFlip -> ColorJitter(0.4, 0.4,
  0.4, 0.1, p=0.8) -> RandomGrayscale(p=0.2) -> Normalize`` on the two views stacked into one batch
  (runs only when kornia is installed: ``pip install kornia``).

For reference, ``step``: forward + backward + SGD step of a CIFAR ResNet-18 of width 32 with an MLP
projection head on the 2 * B augmented images (channels_last), the work the augmentation feeds.

Timing: the cases run in interleaved rounds (one call of each per round) after two warm-up calls,
so that load from other processes on the machine hits all of them alike; the table gives the
median and the best round of wall time, the median process CPU time (all threads; with
``--threads 1`` the least load-sensitive figure), and images/s from the wall times, counting output
images (2 * B per call). The share column is median augmentation time / (that + median step time).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from supcon.data.augment import CIFAR10_MEAN, CIFAR10_STD, AugmentParams, BatchAugment

VIEWS = 2


class GridSampleAugment(BatchAugment):
    """``BatchAugment`` with the crop, resize and flip done by ``F.affine_grid`` + ``F.grid_sample``."""

    def _crop_flip(self, img: torch.Tensor, p: AugmentParams, views: int) -> torch.Tensor:
        B, C, H, W = img.shape
        S, T = self.out_size(H, W)
        # Normalised output coords g map to input coords g * (len/in) + (2 * off + len)/in - 1.
        f = p.box.to(img.dtype)
        sx = f[:, 3] / W
        sx = torch.where(p.flip, -sx, sx)
        theta = torch.zeros(views * B, 2, 3, dtype=img.dtype, device=img.device)
        theta[:, 0, 0] = sx
        theta[:, 0, 2] = (2 * f[:, 1] + f[:, 3]) / W - 1
        theta[:, 1, 1] = f[:, 2] / H
        theta[:, 1, 2] = (2 * f[:, 0] + f[:, 2]) / H - 1
        grid = F.affine_grid(theta, [views * B, C, S, T], align_corners=False)
        src = img.unsqueeze(0).expand(views, B, C, H, W).reshape(views * B, C, H, W)
        return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)


def kornia_pipeline(size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    aug = torch.nn.Sequential(
        K.RandomResizedCrop((size, size), scale=(0.2, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.Normalize(mean=torch.tensor(CIFAR10_MEAN), std=torch.tensor(CIFAR10_STD)),
    )

    def run(x: torch.Tensor) -> torch.Tensor:
        img = x.permute(0, 3, 1, 2).float().div_(255.0)
        return aug(img.repeat(VIEWS, 1, 1, 1))

    return run


def training_step(batch: int, size: int, width: int) -> Callable[[], None]:
    from supcon.models.heads import ProjectionHead
    from supcon.models.resnet import resnet18

    torch.manual_seed(0)
    enc = resnet18(width=width)
    model = torch.nn.Sequential(enc, ProjectionHead(enc.feature_dim, 128)).to(
        memory_format=torch.channels_last
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(VIEWS * batch, 3, size, size).contiguous(memory_format=torch.channels_last)

    def run() -> None:
        # A stand-in loss: the step's cost is the network's, the SupCon loss on 2B x 128 is small.
        loss = model(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


def time_interleaved(
    cases: dict[str, Callable[[], object]], rounds: int
) -> dict[str, list[tuple[float, float]]]:
    """(wall seconds, process CPU seconds) of each call, the cases interleaved round by round."""
    for f in cases.values():
        for _ in range(2):
            f()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, f in cases.items():
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds of the augmentation cases")
    ap.add_argument("--step-repeats", type=int, default=3, help="timed rounds of the training step")
    ap.add_argument("--width", type=int, default=32, help="ResNet-18 width for the reference step")
    ap.add_argument("--no-step", action="store_true", help="skip the ResNet-18 reference step")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.size}x{args.size} images, {VIEWS} views")
    rows = []
    for batch in args.batch_sizes:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (batch, args.size, args.size, 3), dtype=torch.uint8, generator=g)
        ours = BatchAugment()
        ours_grid = GridSampleAugment()
        cases: dict[str, Callable[[], object]] = {
            "supcon matmul": lambda x=x, a=ours, g=g: a(x, views=VIEWS, generator=g),
            "supcon grid_sample": lambda x=x, a=ours_grid, g=g: a(x, views=VIEWS, generator=g),
        }
        kornia = kornia_pipeline(args.size)
        if kornia is not None:
            cases["kornia"] = lambda x=x, k=kornia: k(x)
        with torch.no_grad():
            times = time_interleaved(cases, args.repeats)
        if not args.no_step:
            times.update(
                time_interleaved({"step": training_step(batch, args.size, args.width)}, args.step_repeats)
            )
        step = statistics.median(t for t, _ in times["step"]) if "step" in times else None
        for name, ts in times.items():
            wall = [t for t, _ in ts]
            med, best = statistics.median(wall), min(wall)
            cpu = statistics.median(c for _, c in ts)
            share = "" if step is None or name == "step" else f"{100 * med / (med + step):.1f}%"
            rows.append(
                (
                    batch,
                    name,
                    med * 1e3,
                    best * 1e3,
                    cpu * 1e3,
                    VIEWS * batch / med,
                    VIEWS * batch / best,
                    share,
                )
            )
    step_name = f"step (ResNet-18 w{args.width})"
    print()
    print(
        "| batch | pipeline | wall ms median | wall ms best | CPU ms median | images/s median | images/s best"
        " | aug share of aug + step |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for batch, name, med, best, cpu, ips, ips_best, share in rows:
        label = step_name if name == "step" else name
        cells = [
            str(batch),
            label,
            f"{med:.1f}",
            f"{best:.1f}",
            f"{cpu:.1f}",
            f"{ips:,.0f}",
            f"{ips_best:,.0f}",
        ]
        print("| " + " | ".join([*cells, share]) + " |")


if __name__ == "__main__":
    main()
