"""Epoch times of the Keras example's experiments: supcon vs the example's own Keras code, side by side.

Runs ``supcon compare --preset keras-example`` for a few epochs, then (if a TensorFlow environment
for it exists, made by setup-seed-env.sh beside the Keras script) the example's Keras script on
the same data and machine, and prints seconds per epoch of each phase with the speed-up. The first
epoch of each phase is left out of the medians (one-off warm-up of both frameworks).

    python benchmarks/speed/keras_speed.py --data ../shared/data/cifar10-jpeg --epochs 3

What is timed, to compare like with like:
- cross-entropy: a training epoch plus one pass over the test set (Keras validates every epoch);
- SupCon pre-training: a training epoch;
- classifier on the frozen encoder: a training epoch plus one pass over the test set. supcon computes
  the frozen encoder's features once (``feature_seconds``, reported on its own line and amortised
  over the epochs of the run in the last column); Keras runs the encoder in every step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the project root
KERAS_SCRIPT = ROOT.parent / "shared" / "bench" / "seed_keras.py"


def run_supcon(data: str, epochs: int, work: Path) -> dict:
    out = work / "supcon"
    cmd = [
        sys.executable,
        "-m",
        "supcon",
        "compare",
        "--preset",
        "keras-example",
        "--data",
        data,
        "--epochs",
        str(epochs),
        "--out",
        str(out),
        "--quiet",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    secs = {p: [r["seconds"] for r in rows if r["phase"] == p][1:] for p in ("ce", "pretrain", "linear")}
    feature_seconds = next(r["feature_seconds"] for r in rows if "feature_seconds" in r)
    return {"secs": secs, "feature_seconds": feature_seconds, "test_pass": _test_pass_seconds(out)}


def _test_pass_seconds(run_dir: Path) -> dict:
    """Seconds of one pass over the test set with the trained models, as Keras' per-epoch validation."""
    from supcon.core.runtime import resolve_runtime, tune_cpu
    from supcon.data.datasets import load_split
    from supcon.evaluation.evaluate import extract_features, predict
    from supcon.models.build import load_phase_model
    from supcon.runs.folder import read_config

    cfg = read_config(run_dir)
    rt = resolve_runtime(cfg.device, cfg.precision, cfg.channels_last)
    tune_cpu()  # as the command line's runs
    data, _ = load_split(cfg.data, cfg.seed, progress=False)
    model = load_phase_model(cfg, data, "ce", run_dir / "weights" / "ce.safetensors")
    model = model.to(memory_format=torch.channels_last)
    predict(model, data.test_x[:512], rt, data.norm)  # warm-up
    t0 = time.perf_counter()
    predict(model, data.test_x, rt, data.norm)
    full = time.perf_counter() - t0
    feats = extract_features(model.encoder, data.test_x, rt, data.norm)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.head.eval()(feats).argmax(1)
    return {"full": full, "head_on_features": time.perf_counter() - t0}


def run_keras(python: str, data: str, epochs: int, work: Path) -> dict | None:
    if not Path(python).exists() or not KERAS_SCRIPT.exists():
        return None
    out = work / "seed.json"
    env = {**os.environ, "EPOCHS": str(epochs), "OUT": str(out), "DATA": data}
    subprocess.run([python, str(KERAS_SCRIPT)], check=True, env=env, stdout=subprocess.DEVNULL)
    r = json.loads(out.read_text())
    return {
        "ce": r["ce"]["epoch_seconds"][1:],
        "pretrain": r["supcon"]["pretrain_epoch_seconds"][1:],
        "linear": r["supcon"]["classifier_epoch_seconds"][1:],
        "acc": (r["ce"]["test_accuracy"], r["supcon"]["test_accuracy"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    ap.add_argument("--epochs", type=int, default=3, help="epochs per phase (the first is not counted)")
    ap.add_argument("--keras-python", default=str(Path.home() / ".seed-env" / "bin" / "python"))
    ap.add_argument("--run-epochs", type=int, default=50, help="epochs of a full run, to amortise features")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours = run_supcon(args.data, args.epochs, work)
        keras = run_keras(args.keras_python, args.data, args.epochs, work)
    med = {p: statistics.median(v) for p, v in ours["secs"].items()}
    ours_epoch = {
        "ce": med["ce"] + ours["test_pass"]["full"],
        "pretrain": med["pretrain"],
        "linear": med["linear"] + ours["test_pass"]["head_on_features"],
    }
    amortised = dict(ours_epoch, linear=ours_epoch["linear"] + ours["feature_seconds"] / args.run_epochs)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.epochs} epochs per phase "
        f"(median of epochs 2..{args.epochs})"
    )
    print(
        f"supcon one-off: frozen-encoder features {ours['feature_seconds']:.2f} s; "
        f"test pass {ours['test_pass']['full']:.2f} s"
    )
    print()
    print("| phase | Keras example s/epoch | supcon s/epoch | speed-up | supcon incl. amortised features |")
    print("|---|---|---|---|---|")
    names = {
        "ce": "cross-entropy (+ test pass)",
        "pretrain": "SupCon pre-training",
        "linear": "classifier on frozen encoder (+ test pass)",
    }
    for p, name in names.items():
        k = statistics.median(keras[p]) if keras else float("nan")
        print(f"| {name} | {k:.2f} | {ours_epoch[p]:.2f} | {k / ours_epoch[p]:.1f}x | {amortised[p]:.2f} |")
    if keras is None:
        print("\n(Keras environment not found: run ../shared/bench/setup-seed-env.sh for the side-by-side)")


if __name__ == "__main__":
    main()
