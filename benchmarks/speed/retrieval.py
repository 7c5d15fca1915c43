"""Retrieval at CIFAR scale: time and peak memory of the metrics on 60k embeddings, exact vs faiss.

Embeddings: ``--classes`` Gaussian clusters on the unit sphere in ``--dim`` dimensions (noise
``--noise``), ``--gallery`` gallery and ``--queries`` query vectors (CIFAR-10's 50k / 10k by
default), or the `.npz` written by ``supcon embed --split all`` of a run (``--embeddings``: the
test rows query the training rows). Each backend runs in a fresh process, so its peak resident
memory (VmHWM) is its own.

    python benchmarks/speed/retrieval.py [--embeddings emb.npz]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def embeddings(args) -> tuple[torch.Tensor, ...]:
    if args.embeddings:
        z = np.load(args.embeddings, allow_pickle=False)
        test = z["splits"] == "test"
        emb, y = torch.from_numpy(z["embeddings"]), torch.from_numpy(z["labels"]).long()
        return emb[test], y[test], emb[~test], y[~test]
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(args.classes, args.dim, generator=g), dim=1)

    def draw(n):
        y = torch.randint(args.classes, (n,), generator=g)
        return centres[y] + args.noise * torch.randn(n, args.dim, generator=g) / args.dim**0.5, y

    q, qy = draw(args.queries)
    gal, gy = draw(args.gallery)
    return q, qy, gal, gy


def one(args) -> None:
    from supcon.evaluation.retrieval import retrieval_metrics

    q, qy, gal, gy = embeddings(args)
    t0 = time.perf_counter()
    m = retrieval_metrics(q, qy, gal, gy, backend=args.backend)
    seconds = time.perf_counter() - t0
    hwm = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    print(json.dumps({"seconds": seconds, "peak_gib": hwm / 2**30, "metrics": m}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embeddings", type=Path)
    ap.add_argument("--queries", type=int, default=10000)
    ap.add_argument("--gallery", type=int, default=50000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--noise", type=float, default=6.0)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.backend:
        return one(args)
    q, _, gal, _ = embeddings(args)
    print(f"{len(q)} queries x {len(gal)} gallery, dim {q.shape[1]}, {torch.get_num_threads()} threads")
    print("| backend | seconds | peak resident memory | P@1 | MAP@R | kNN@200 |\n|---|---|---|---|---|---|")
    found = {}
    for backend in ("exact", "faiss"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--backend", backend]
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        m = found[backend] = out["metrics"]
        cells = [f"{out['seconds']:.1f}", f"{out['peak_gib']:.2f} GiB"]
        cells += [f"{100 * m[k]:.2f}" for k in ("precision@1", "map@r", "knn@200")]
        print(f"| {backend} | {' | '.join(cells)} |", flush=True)
    same = all(abs(found["exact"][k] - found["faiss"][k]) < 1e-6 for k in found["exact"])
    print(f"\nexact and faiss give the same metrics: {same}")


if __name__ == "__main__":
    main()
