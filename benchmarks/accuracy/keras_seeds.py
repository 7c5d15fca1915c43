"""The Keras example's recipe over seeds: cross-entropy against SupCon + classifier, joint
SupCon + cross-entropy training, and SupCon with the label-aware memory queue, all at the example's
batch 256 on the whole of CIFAR-10.

    python benchmarks/accuracy/keras_seeds.py --data /data/cifar10-jpeg --out /tmp/keras-seeds --seeds 0,1,2

``--data`` is any CIFAR-10 source ``--data`` takes. The runs, each the ``keras-example`` recipe
(its CNN, Adam, no augmentation) with ``--epochs`` epochs per phase (default 50, the example's):

- ``cross-entropy`` and ``SupCon + classifier``: ``supcon compare --preset keras-example``;
- ``SupCon+CE joint classifier``: ``supcon pretrain --preset keras-example-joint`` with
  ``loss.ce_detach=false`` (the cross-entropy trains the encoder beside the npairs loss), the linear
  classifier trained with it;
- ``SupCon + queue + classifier``: ``supcon pretrain --preset keras-example-queue`` (4,096 keys from
  a momentum encoder), then ``supcon linear --from``.

Finished seeds are read back, so the same command continues an interrupted benchmark; ``--only``
runs a subset of the runs. The table gives test accuracy, mean ± sample standard deviation over the
seeds, the per-seed values, the paired difference against cross-entropy with its 95% Student-t
interval, and the mean training time (pre-training included for the classifiers on frozen encoders).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import Run, add_common_arguments, result_row, run_all

from supcon.core.runlog import phase_seconds
from supcon.runs.seeds import mean_std, paired_difference, seed_dir

RUNS = {  # run folder: (command, preset, its --from folder, overrides beyond the common ones)
    "compare": ("compare", "keras-example", None, {}),
    "joint": ("pretrain", "keras-example-joint", None, {"loss.ce_detach": False}),
    "queue": ("pretrain", "keras-example-queue", None, {}),
    "queue-linear": ("linear", None, "queue", {}),
}


def _runs(args) -> list[Run]:
    base = {"data.path": str(args.data), "data.dataset": None, "tune_cpu": True}
    base |= {f"{phase}.epochs": args.epochs for phase in ("ce", "pretrain", "linear")}
    runs = [(folder, *RUNS[folder]) for folder in args.only.split(",")]
    return [(f, c, p, src, {} if src else base | extra) for f, c, p, src, extra in runs]


ROWS = [  # (table row, run folder, experiment name in that run's results, phases it trained)
    ("cross-entropy", "compare", "cross-entropy", {"compare": ("ce",)}),
    ("SupCon + classifier", "compare", "SupCon + frozen classifier", {"compare": ("pretrain", "linear")}),
    ("SupCon+CE joint classifier", "joint", "SupCon+CE joint classifier", {"joint": ("pretrain",)}),
    (
        "SupCon + queue + classifier", "queue-linear", "frozen encoder + classifier",
        {"queue": ("pretrain",), "queue-linear": ("linear",)},
    ),
]  # fmt: skip


def _accuracies(out: Path, folder: str, experiment: str) -> dict[int, float] | None:
    """Test accuracy per finished seed of one table row, or None before its run has results."""
    if not (out / folder / "results.json").exists():
        return None
    row = result_row(out / folder, experiment)
    return dict(zip(row["seeds"], row["per_seed"], strict=True))


def table(out: Path, seeds: list[int]) -> str:
    lines = ["| method | accuracy | per seed | vs cross-entropy (95% CI) | train time |"]
    lines.append("|---|---|---|---|---|")
    ce = _accuracies(out, "compare", "cross-entropy") or {}
    for name, folder, experiment, phases in ROWS:
        baseline = (folder, experiment) == ("compare", "cross-entropy")
        acc = ce if baseline else _accuracies(out, folder, experiment)
        if not acc:
            continue
        have = [s for s in seeds if s in acc]
        vals = [acc[s] for s in have]
        mean, std = mean_std(vals)
        cell = f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")
        per = ", ".join(f"{100 * v:.2f}" for v in vals)
        both = [s for s in seeds if s in acc and s in ce]
        diff = "-" if baseline else _diff(acc, ce, both)
        secs = [sum(phase_seconds(seed_dir(out / f, s), p) for f, p in phases.items()) for s in have]
        lines.append(f"| {name} | {cell} | {per} | {diff} | {sum(secs) / len(secs) / 60:.1f} min |")
    return "\n".join(lines)


def _diff(acc: dict[int, float], ce: dict[int, float], seeds: list[int]) -> str:
    if not seeds:
        return "n/a"
    d = paired_difference([acc[s] for s in seeds], [ce[s] for s in seeds])
    if d["ci"] is None:
        return f"{100 * d['mean']:+.2f}"
    lo, hi = d["ci"]
    return f"{100 * d['mean']:+.2f} ({100 * lo:+.2f}, {100 * hi:+.2f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="CIFAR-10 (image folder or pickle copy)")
    add_common_arguments(p, [0, 1, 2], "folder for the run folders")
    p.add_argument("--epochs", type=int, default=50, help="epochs of every phase")
    p.add_argument("--only", default=",".join(RUNS), help=f"runs to train, of {','.join(RUNS)}")
    args = p.parse_args(argv)
    if not args.table_only:
        run_all(args.out, _runs(args), args.seeds, args.device)
    print(table(args.out, args.seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
