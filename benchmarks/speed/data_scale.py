"""Data at real resolution: the on-disk store and the prefetched crops against in-memory batches.

1. Builds a photo-like image folder from a CIFAR-10 image-folder copy: every image upscaled
   (bicubic) to a random aspect ratio in [3/4, 4/3] (log-uniform) with an area of 256 x 256 pixels,
   saved as JPEG (quality 90) under ``--work``/photos/{train,test}/<class>/. Seeded; built once.
2. For each training size (64, 128, 224 px): builds the store (short side size / 0.875), then
   pre-trains ResNet-18 with the ImageNet stem for ``--steps`` steps (SupCon, two views, batch
   ``--batch``) reading prefetched random resized crops from the store, as training does; and the
   same model step fed from uint8 batches already in memory. Prints images/s of both, the share of
   step time spent waiting for data, the peak anonymous resident memory during training (pages of
   the mapped store are the page cache's, not the process's), store size and build time.

    python benchmarks/speed/data_scale.py --cifar PATH/cifar10-jpeg --work /tmp/scale [--images 60000]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import torch

from supcon.core.runtime import resolve_runtime
from supcon.data.augment import AugmentConfig, BatchAugment
from supcon.data.datasets import load_dataset
from supcon.data.imageset import storage_side
from supcon.data.prefetch import Prefetch
from supcon.losses.supcon import supcon_loss
from supcon.models.build import ContrastiveModel, build_projection

AREA = 256 * 256


def _photo_job(job):
    from PIL import Image

    src, dst, seed = job
    rng = np.random.default_rng(seed)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = round(math.sqrt(AREA * aspect)), round(math.sqrt(AREA / aspect))
    with Image.open(src) as im:
        im.convert("RGB").resize((w, h), Image.Resampling.BICUBIC).save(dst, quality=90)
    return 1


def build_photos(cifar: Path, out: Path, n: int) -> Path:
    done = out / ".complete"
    if done.is_file() and done.read_text() == str(n):
        return out
    files = sorted(p for p in cifar.glob("*/*/*.jpg"))
    rng = np.random.default_rng(0)
    pick = sorted(rng.permutation(len(files))[:n]) if n < len(files) else range(len(files))
    jobs = []
    for i in pick:
        src = files[i]
        dst = out / src.relative_to(cifar)
        dst.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(src), str(dst), int(i)))
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        for _ in pool.imap_unordered(_photo_job, jobs, chunksize=64):
            pass
    done.write_text(str(n))
    print(f"built {len(jobs)} photos in {time.perf_counter() - t0:.0f} s under {out}", flush=True)
    return out


class PeakAnon:
    """Peak of the process's anonymous resident memory (RssAnon), polled in a thread."""

    def __init__(self, every: float = 0.02):
        self.peak, self.every, self._stop = 0, every, threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)

    def _read(self) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"RssAnon:\s+(\d+) kB", text).group(1)) * 1024

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(self.every)

    def __enter__(self):
        self.peak = self._read()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def model_and_step(rt, size: int):
    from supcon.models.encoders import build_encoder

    encoder = build_encoder("resnet18", stem="imagenet", image_size=size)
    model = ContrastiveModel(encoder, build_projection_for(encoder)).to(rt.device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    augment = BatchAugment(AugmentConfig(mode="supcon", crop=False, normalize=False))

    def step(x_uint8: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> None:
        x = augment(x_uint8.to(rt.device), views=1, generator=g)
        z = model(x).float()
        b = len(y)
        loss = supcon_loss(z.view(2, b, -1).transpose(0, 1), y, temperature=0.1, variant="out")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, step


def build_projection_for(encoder):
    from supcon.core.config import Config

    cfg = Config()
    cfg.model.projection = "mlp"
    return build_projection(cfg, encoder.feature_dim)


def measure(data, size: int, steps: int, batch: int, rt) -> dict:
    model, step = model_and_step(rt, size)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(data.train_y), generator=g)
    local = [perm[s * batch : (s + 1) * batch] for s in range(steps + 2)]
    x = data.train_x

    def prepare(idx, rng):
        return x.random_crops(idx, rng, views=2)

    step(prepare(local[0], np.random.default_rng(0)), data.train_y[local[0]], g)  # warm-up
    # In memory: the same step on crops prepared beforehand (what a dataset held in RAM would give).
    held = [prepare(local[s], np.random.default_rng(s)) for s in range(1, 4)]
    t0 = time.perf_counter()
    for s in range(steps):
        step(held[s % 3], data.train_y[local[1 + s % 3]], g)
    memory_s = time.perf_counter() - t0
    with PeakAnon() as mem, Prefetch(prepare, lambda s: local[s], (0, size), steps) as feed:
        t0 = time.perf_counter()
        for s in range(steps):
            step(feed.take(s), data.train_y[local[s]], g)
        store_s = time.perf_counter() - t0
    n = steps * batch
    return {
        "store_img_s": n / store_s,
        "memory_img_s": n / memory_s,
        "wait_share": feed.wait_seconds / store_s,
        "peak_anon_gib": mem.peak / 2**30,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", type=Path, required=True, help="CIFAR-10 as an image folder (train/, test/)")
    ap.add_argument("--work", type=Path, required=True, help="where the photos (and SUPCON_DATA) go")
    ap.add_argument("--images", type=int, default=60000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("SUPCON_DATA", str(args.work / "cache"))
    photos = build_photos(args.cifar, args.work / "photos", args.images)
    rt = resolve_runtime("auto", "fp32", True)
    print(f"{args.images} photos, {torch.get_num_threads()} threads, {rt.describe()}, batch {args.batch} x 2")
    header = "| px | store | build s | store img/s | in-memory img/s | store/memory | data wait | peak anon |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for size in args.sizes:
        t0 = time.perf_counter()
        data = load_dataset("imagefolder", str(photos), image_size=size, store="disk", progress=False)
        build_s = time.perf_counter() - t0
        store_bytes = data.train_x.store.images.nbytes
        r = measure(data, size, args.steps, args.batch, rt)
        ratio = r["store_img_s"] / r["memory_img_s"]
        print(
            f"| {size} | {store_bytes / 2**30:.2f} GiB (short side {storage_side(size)}) | "
            f"{build_s:.0f} | {r['store_img_s']:.1f} | {r['memory_img_s']:.1f} | {ratio:.2f} | "
            f"{100 * r['wait_share']:.1f}% | {r['peak_anon_gib']:.2f} GiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
