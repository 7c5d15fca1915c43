"""Long-tailed CIFAR-10: cross-entropy, SupCon + probe, SupCon with class-balanced sampling + probe,
and Balanced Contrastive Learning (BCL), over seeds, at the same encoder and about the same wall time.

    python benchmarks/accuracy/longtail.py --data /data/cifar10-jpeg --out /tmp/lt --seeds 0,1,2

``--data`` is any CIFAR-10 source ``--data`` takes (an image folder, a python-pickle copy or its
archive); the training set is made long-tailed with the profile of Cao et al. 2019
(``data.imbalance``, default 100: 5,000 down to 50 images per class, 12,406 in all); the test set
stays balanced. Every run is the ``cpu-fast`` preset (a narrow ResNet-18, batch 256) with
``--set`` overrides; a one-view cross-entropy epoch costs about half a two-view contrastive one, so
cross-entropy trains twice the contrastive epochs (``--ce-epochs``, ``--pretrain-epochs``):

- ``cross-entropy`` and ``SupCon + probe``: ``supcon compare``;
- ``cross-entropy, class-balanced``: ``supcon train-ce --set data.sampler=class-balanced``;
- ``SupCon + class-balanced probe``: the probe alone retrained on the same encoder with
  class-balanced sampling (``supcon linear --from`` the compare run);
- ``SupCon, class-balanced + probe``: ``supcon pretrain --set data.sampler=class-balanced``, then
  ``supcon linear --from`` (the probe samples as its pre-training did);
- ``BCL classifier`` and ``BCL + probe``: ``supcon pretrain --method bcl --set loss.temperature=0.1``
  (the paper's loss weights 2.0 and 0.6), its own classifier and a probe on its encoder.

Finished seeds are read back, so the same command continues an interrupted benchmark. The table
gives test accuracy overall and per group of classes by training images (many > 100, medium
20-100, few < 20), mean ± sample standard deviation over the seeds, and the mean training time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import Run, add_common_arguments, result_row, run_all

from supcon.core.runlog import phase_seconds
from supcon.runs.seeds import seed_dir

GROUPS = ("test_acc", "many_acc", "medium_acc", "few_acc")


def _runs(args) -> list[Run]:
    """(run folder, command, preset, its --from folder, overrides) per run."""
    base = {"data.path": str(args.data), "data.dataset": None, "data.imbalance": args.imbalance}
    base |= {"data.val_fraction": 0.0, "knn_every": 0, "tune_cpu": True}
    ce = {"ce.epochs": args.ce_epochs, "pretrain.epochs": args.pretrain_epochs}
    pre = {"pretrain.epochs": args.pretrain_epochs}
    return [
        ("compare", "compare", "cpu-fast", None, base | ce),
        ("ce-balanced", "train-ce", "cpu-fast", None, base | ce | {"data.sampler": "class-balanced"}),
        ("balanced", "pretrain", "cpu-fast", None, base | pre | {"data.sampler": "class-balanced"}),
        ("balanced-linear", "linear", None, "balanced", {}),
        ("compare-balanced-probe", "linear", None, "compare", {"data.sampler": "class-balanced"}),
        ("bcl", "pretrain", "cpu-fast", None, base | pre | {"loss.method": "bcl", "loss.temperature": 0.1}),
        ("bcl-linear", "linear", None, "bcl", {}),
    ]


ROWS = [  # (table row, run folder, experiment name in that run's results)
    ("cross-entropy", "compare", "cross-entropy"),
    ("cross-entropy, class-balanced", "ce-balanced", "cross-entropy"),
    ("SupCon + probe", "compare", "SupCon + frozen classifier"),
    ("SupCon + class-balanced probe", "compare-balanced-probe", "frozen encoder + classifier"),
    ("SupCon, class-balanced + probe", "balanced-linear", "frozen encoder + classifier"),
    ("BCL classifier", "bcl", "BCL classifier"),
    ("BCL + probe", "bcl-linear", "frozen encoder + classifier"),
]
PHASES = {"compare-balanced-probe": "compare", "balanced-linear": "balanced", "bcl-linear": "bcl"}


def _train_seconds(out: Path, name: str, folder: str, seed: int) -> float:
    """Training time of a table row's model: its phases, the pre-training of a probe included."""
    if name.startswith("cross-entropy"):
        return phase_seconds(seed_dir(out / folder, seed), ("ce",))
    pre = PHASES.get(folder) or folder
    total = phase_seconds(seed_dir(out / pre, seed), ("pretrain",))
    if "probe" in name:
        total += phase_seconds(seed_dir(out / folder, seed), ("linear",))
    return total


def table(out: Path, seeds: list[int]) -> str:
    def pct(m: dict | None) -> str:
        if m is None:
            return "n/a"
        return f"{100 * m['mean']:.2f}" + ("" if m["std"] is None else f" ± {100 * m['std']:.2f}")

    lines = ["| method | overall | many | medium | few | train time |", "|---|---|---|---|---|---|"]
    for name, folder, experiment in ROWS:
        row = result_row(out / folder, experiment)
        cells = [pct(row["metrics"].get(k)) for k in GROUPS]
        secs = [_train_seconds(out, name, folder, s) for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sum(secs) / len(secs) / 60:.1f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="CIFAR-10 (image folder or pickle copy)")
    add_common_arguments(p, [0, 1, 2], "folder for the run folders")
    p.add_argument("--imbalance", type=float, default=100.0)
    p.add_argument("--ce-epochs", type=int, default=12)
    p.add_argument("--pretrain-epochs", type=int, default=6)
    args = p.parse_args(argv)
    if not args.table_only:
        run_all(args.out, _runs(args), args.seeds, args.device)
    print(table(args.out, args.seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
