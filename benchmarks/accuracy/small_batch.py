"""SupCon at a small batch, with and without the label-aware memory queue, against a large batch and
against cross-entropy, over seeds, on a class-balanced subset of CIFAR-10.

    python benchmarks/accuracy/small_batch.py --cifar /data/cifar10-jpeg --out /tmp/small-batch --seeds 0,1

The data: ``--per-class`` training images of each CIFAR-10 class (default 500: 5,000 in all), drawn
with ``random.Random(0)`` from each class folder's sorted file names, and the whole test set, as a
CSV manifest written to ``OUT/cifar10-subset.csv``. ``--cifar`` is an image-folder copy of CIFAR-10
(``train/<class>/*`` and ``test/<class>/*``).

The runs, all the ``cpu-fast`` encoder (a narrow ResNet-18) and schedule shape, the learning rate
scaled linearly with the batch (0.2 at 256, so 0.025 at 32):

- ``cross-entropy, batch 32`` and ``SupCon, batch 32 + probe``: ``supcon compare`` at batch 32,
  ``--ce-epochs`` (default 20) and ``--pretrain-epochs`` (default 10) so both take about the same
  time (a one-view epoch costs about half a two-view one);
- ``SupCon, batch 32 + queue + probe``: the ``cpu-fast-queue`` preset (8192 keys from a momentum
  encoder, m = 0.99) at batch 32, then ``supcon linear --from``;
- ``SupCon, batch 256 + probe``: ``cpu-fast`` as it is, then ``supcon linear --from``.

Finished seeds are read back, so the same command continues an interrupted benchmark. The table
gives test accuracy, mean ± sample standard deviation over seeds, the per-seed values, and the
mean training time (pre-training included for the probes).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from common import Run, add_common_arguments, result_row, run_all

from supcon.core.runlog import phase_seconds
from supcon.runs.seeds import seed_dir

ROWS = [  # (table row, run folder, experiment name in that run's results)
    ("cross-entropy, batch 32", "b32", "cross-entropy"),
    ("SupCon, batch 32 + probe", "b32", "SupCon + frozen classifier"),
    ("SupCon, batch 32 + queue + probe", "b32-queue-linear", "frozen encoder + classifier"),
    ("SupCon, batch 256 + probe", "b256-linear", "frozen encoder + classifier"),
]


def subset(cifar: Path, out: Path, per_class: int) -> Path:
    """The CSV manifest of the subset (rewritten identically from the same arguments)."""
    rng, rows = random.Random(0), []
    for split, n in (("train", per_class), ("test", None)):
        folder = cifar / split
        if not folder.is_dir():
            raise SystemExit(f"{folder} is not a folder: --cifar needs train/<class>/* and test/<class>/*")
        for c in sorted(p.name for p in folder.iterdir() if p.is_dir()):
            files = sorted(p.name for p in (folder / c).iterdir())
            files = sorted(rng.sample(files, n)) if n else files
            rows += [f"{(folder / c / f).resolve()},{c},{split}" for f in files]
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "cifar10-subset.csv"
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return manifest


def _runs(args, manifest: Path) -> list[Run]:
    """(run folder, command, preset, its --from folder, overrides) per run."""
    base = {"data.path": str(manifest), "data.dataset": None, "data.val_fraction": 0.0}
    base |= {"knn_every": 0, "tune_cpu": True, "pretrain.epochs": args.pretrain_epochs}
    small = {"ce.batch_size": 32, "pretrain.batch_size": 32, "ce.lr": 0.025, "pretrain.lr": 0.025}
    small |= {"ce.epochs": args.ce_epochs}
    return [
        ("b32", "compare", "cpu-fast", None, base | small),
        ("b32-queue", "pretrain", "cpu-fast-queue", None, base | small),
        ("b32-queue-linear", "linear", None, "b32-queue", {}),
        ("b256", "pretrain", "cpu-fast", None, base),
        ("b256-linear", "linear", None, "b256", {}),
    ]


def _train_seconds(out: Path, name: str, folder: str, seed: int) -> float:
    if name.startswith("cross-entropy"):
        return phase_seconds(seed_dir(out / folder, seed), ("ce",))
    pre = seed_dir(out / folder.removesuffix("-linear"), seed)
    return phase_seconds(pre, ("pretrain",)) + phase_seconds(seed_dir(out / folder, seed), ("linear",))


def table(out: Path, seeds: list[int]) -> str:
    lines = ["| method | accuracy | per seed | train time |", "|---|---|---|---|"]
    for name, folder, experiment in ROWS:
        row = result_row(out / folder, experiment)
        std = "" if row["test_acc_std"] is None else f" ± {100 * row['test_acc_std']:.2f}"
        per = ", ".join(f"{100 * v:.2f}" for v in row["per_seed"])
        minutes = sum(_train_seconds(out, name, folder, s) for s in seeds) / len(seeds) / 60
        lines.append(f"| {name} | {100 * row['test_acc']:.2f}{std} | {per} | {minutes:.1f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar", type=Path, required=True, help="CIFAR-10 image folder")
    add_common_arguments(p, [0, 1], "folder for the manifest and the run folders")
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--ce-epochs", type=int, default=20)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    args = p.parse_args(argv)
    if not args.table_only:
        manifest = subset(args.cifar, args.out, args.per_class)
        run_all(args.out, _runs(args, manifest), args.seeds, args.device)
    print(table(args.out, args.seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
