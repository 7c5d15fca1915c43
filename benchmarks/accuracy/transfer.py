"""Transfer with ``--pretrained``: an encoder pre-trained on CIFAR-10 at 32 px, loaded into a run at
64 px on CIFAR-10 image files, against the same run from scratch (same epochs, same recipe).

1. ``supcon pretrain --preset cpu-fast`` on CIFAR-10 (32 px, in memory) for ``--source-epochs``.
2. A CSV manifest of ``--per-class`` training images per class of the CIFAR-10 image folder (the
   whole test set), trained at 64 px from the on-disk store: ``supcon pretrain`` from scratch and
   with ``--pretrained`` the weights of step 1, ``--epochs`` each, then the linear probe
   (``supcon linear --from``) on each. Both encoders keep the CIFAR stem (``model.stem=cifar``) so
   that the 32 px weights fit the 64 px model.

    python benchmarks/accuracy/transfer.py --cifar PATH/cifar10-jpeg --work /tmp/transfer
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import supcon


def manifest(cifar: Path, out: Path, per_class: int) -> Path:
    rows = ["path,label,split"]
    for split in ("train", "test"):
        for folder in sorted((cifar / split).iterdir()):
            files = sorted(folder.glob("*.jpg"))
            for f in files[:per_class] if split == "train" else files:
                rows.append(f"{f},{folder.name},{split}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(rows) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", type=Path, required=True, help="CIFAR-10 as an image folder (train/, test/)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--source-epochs", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=1000)
    args = ap.parse_args()
    common = {"model.stem": "cifar", "tune_cpu": True, "knn_every": 0, "data.val_fraction": 0.0}
    t0 = time.perf_counter()
    source = args.work / "source-32px"
    if not (source / "weights" / "pretrain.safetensors").is_file():
        supcon.run(
            "pretrain", "cpu-fast", source, overwrite=True, progress=False,
            overrides=common | {"data.dataset": "imagefolder", "data.path": str(args.cifar),
                                "data.image_size": 32, "pretrain.epochs": args.source_epochs},
        )  # fmt: skip
    print(f"source: {args.source_epochs} epochs at 32 px, {time.perf_counter() - t0:.0f} s", flush=True)
    csv = manifest(args.cifar, args.work / "cifar10-subset.csv", args.per_class)
    target = common | {"data.dataset": "imagefolder", "data.path": str(csv), "data.image_size": 64,
                       "data.store": "disk", "pretrain.epochs": args.epochs}  # fmt: skip
    rows = []
    weights = str(source / "weights" / "pretrain.safetensors")
    for name, folder, extra in (
        ("from scratch", "scratch", {}),
        ("--pretrained (32 px)", "pretrained", {"model.pretrained": weights}),
    ):
        out = args.work / folder
        t0 = time.perf_counter()
        supcon.run("pretrain", "cpu-fast", out, overwrite=True, progress=False, overrides=target | extra)
        probe_dir = args.work / f"{folder}-probe"
        supcon.run("linear", None, probe_dir, from_dir=out, overwrite=True, progress=False)
        probe = json.loads((probe_dir / "results.json").read_text())["rows"][0]["test_acc"]
        knn = json.loads((out / "results.json").read_text())["rows"][0]["test_acc"]
        rows.append((name, probe, knn, time.perf_counter() - t0))
    n = 10 * args.per_class
    print(f"\nCIFAR-10 at 64 px, {n} training images, {args.epochs} pre-training epochs each")
    print("| encoder start | probe test acc | kNN test acc | seconds |\n|---|---|---|---|")
    for name, probe, knn, s in rows:
        print(f"| {name} | {100 * probe:.2f}% | {100 * knn:.2f}% | {s:.0f} |")


if __name__ == "__main__":
    main()
