"""Multi-label CIFAR mosaics: one-vs-rest BCE training against multi-label SupCon + a one-vs-rest probe.

    python benchmarks/accuracy/multilabel.py --cifar /data/cifar10-jpeg --out /tmp/mosaics
    python benchmarks/accuracy/multilabel.py --cifar /data/cifar10-jpeg --out /tmp/mosaics \\
        --train 20000 --test 4000 --ce-epochs 30 --pretrain-epochs 15 --linear-epochs 20

The data: each image is a 2x2 mosaic (64 x 64 px) of four CIFAR-10 images drawn at random (with
replacement over the images, so classes can repeat); its labels are the set of their classes (one
to four of the ten). Training mosaics are made of CIFAR's training images and test mosaics of its
test images only. Everything follows ``--seed``: the same arguments write the same PNG files and
the same ``mosaics.csv`` (``path,labels,split``), which is written once per folder and reused.

``--cifar`` is an image-folder copy of CIFAR-10 (``train/<class>/*`` and ``test/<class>/*``).

The runs, each through ``supcon.run`` on the manifest with the same ``--preset`` (default
``cpu-fast``) and ``--set`` overrides:

- ``BCE``: ``train-ce``, encoder + classifier with one-vs-rest binary cross-entropy;
- ``SupCon (<rule>) + probe``: ``pretrain`` with ``loss.multilabel=<rule>`` for each of ``--rules``
  (default ``jaccard any``), then ``linear``: a one-vs-rest classifier on the frozen encoder.

The table gives test mAP, micro-F1 and macro-F1 (threshold 0.5 on the sigmoid) and the wall time of
each run (data loading included: the decode is cached after the first run).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

TILE = 32  # CIFAR's own size: a 2 x 2 mosaic is 64 px
GRID = 2
FORMAT = 1  # bump when the same arguments would write different mosaics


def _images(root: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    folder = root / split
    if not folder.is_dir():
        sys.exit(f"{folder} is not a folder: --cifar needs train/<class>/* and test/<class>/*")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files, labels = [], []
    for c, name in enumerate(classes):
        found = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        files += found
        labels += [c] * len(found)
    if len(classes) < 2 or not files:
        sys.exit(f"{folder}: expected class folders of images, found {len(classes)} classes")
    return files, labels, classes


def _tile(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (TILE, TILE):
            im = im.resize((TILE, TILE), Image.Resampling.BILINEAR)
        return np.asarray(im)


def _mosaics(root: Path, split: str, n: int, rng: np.random.Generator, out: Path) -> list[list[str]]:
    """``n`` mosaics of ``split``'s images written as PNG files under ``out/split``; their CSV rows."""
    files, labels, classes = _images(root, split)
    (out / split).mkdir(parents=True, exist_ok=True)
    picks = rng.integers(0, len(files), size=(n, GRID * GRID))
    rows = []
    for i, pick in enumerate(picks):
        tiles = [_tile(files[j]) for j in pick]
        grid = np.concatenate([np.concatenate(tiles[r * GRID : (r + 1) * GRID], 1) for r in range(GRID)], 0)
        rel = f"{split}/{i:06d}.png"
        Image.fromarray(grid).save(out / rel)
        names = sorted({classes[labels[j]] for j in pick})
        rows.append([rel, ";".join(names), split])
    return rows


def build(cifar: Path, out: Path, n_train: int, n_test: int, seed: int) -> Path:
    """The mosaic data set in ``out`` (reused when built before with the same arguments)."""
    manifest, stamp = out / "mosaics.csv", out / "mosaics.json"
    params = {"cifar": str(cifar.resolve()), "train": n_train, "test": n_test, "seed": seed, "format": FORMAT}
    if manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == params:
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    rows = _mosaics(cifar, "train", n_train, rng, out) + _mosaics(cifar, "test", n_test, rng, out)
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels", "split"])
        w.writerows(rows)
    stamp.write_text(json.dumps(params))
    sizes = np.array([len(r[1].split(";")) for r in rows])
    print(
        f"wrote {len(rows)} mosaics to {out} in {time.perf_counter() - t0:.1f} s "
        f"(labels per image: mean {sizes.mean():.2f}, {np.bincount(sizes, minlength=5)[1:].tolist()} "
        "with 1/2/3/4)",
        flush=True,
    )
    return manifest


def _run(command: str, out: Path, args, overrides: dict, from_dir: Path | None = None) -> tuple[dict, float]:
    import supcon

    t0 = time.perf_counter()
    res = supcon.run(
        command, None if from_dir else args.preset, out, overrides=overrides, overwrite=True,
        from_dir=from_dir, device=args.device,
    )  # fmt: skip
    return res["rows"][-1], time.perf_counter() - t0


def _overrides(args, manifest: Path) -> dict:
    from supcon.core.config import load_preset, set_value

    base = {"data.dataset": None, "data.path": str(manifest), "data.image_size": None, "seed": args.seed}
    base |= {"ce.epochs": args.ce_epochs, "pretrain.epochs": args.pretrain_epochs}
    base |= {"linear.epochs": args.linear_epochs}
    if args.batch_size:
        base |= {f"{p}.batch_size": args.batch_size for p in ("ce", "pretrain", "linear")}
    extra = {}
    cfg = load_preset(args.preset)
    for assignment in args.set:  # checked now: a typo fails before any training
        set_value(cfg, assignment)
        key, raw = assignment.split("=", 1)
        extra[key.strip()] = _value(cfg, key.strip())
    return {k: v for k, v in base.items() if v is not None or k.startswith("data.")} | extra


def _value(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _table(results: list[tuple[str, dict, float]]) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    head = ["method", "mAP", "micro-F1", "macro-F1", "wall time"]
    body = [
        [name, pct(r.get("map")), pct(r.get("micro_f1")), pct(r.get("macro_f1")), f"{s:.1f} s"]
        for name, r, s in results
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    lines = [fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + [fmt.format(*b) for b in body])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar", type=Path, required=True, help="CIFAR-10 image folder")
    p.add_argument("--out", type=Path, required=True, help="folder for the mosaics and the run folders")
    p.add_argument("--train", type=int, default=20000, help="training mosaics")
    p.add_argument("--test", type=int, default=4000, help="test mosaics")
    p.add_argument("--seed", type=int, default=0, help="mosaics and runs")
    p.add_argument("--preset", default="cpu-fast")
    p.add_argument("--ce-epochs", type=int, default=None, help="BCE epochs (default: the preset's)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="SupCon epochs (default: the preset's)")
    p.add_argument("--linear-epochs", type=int, default=None, help="probe epochs (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="every phase (default: the preset's)")
    p.add_argument("--rules", nargs="+", default=["jaccard", "any"], choices=["jaccard", "any"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--device", default="auto")
    p.add_argument("--build-only", action="store_true", help="write the mosaics, train nothing")
    args = p.parse_args(argv)
    if min(args.train, args.test) < 1:
        p.error("--train and --test need at least one mosaic each")
    manifest = build(args.cifar, args.out, args.train, args.test, args.seed)
    if args.build_only:
        return 0
    overrides = _overrides(args, manifest)
    runs = args.out / "runs"
    results = []
    row, s = _run("train-ce", runs / "bce", args, overrides)
    results.append(("BCE (train-ce)", row, s))
    for rule in args.rules:
        pre_dir = runs / f"supcon-{rule}"
        _, s_pre = _run("pretrain", pre_dir, args, overrides | {"loss.multilabel": rule})
        row, s_lin = _run("linear", runs / f"probe-{rule}", args, {}, from_dir=pre_dir)
        results.append((f"SupCon ({rule}) + probe", row, s_pre + s_lin))
    print()
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
