"""What the accuracy benchmarks share (longtail.py, small_batch.py, keras_seeds.py): their common
arguments, the run loop, and reading one experiment's row of a folder of seeds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import supcon
from supcon.runs.seeds import parse_seeds

Run = tuple[str, str, str | None, str | None, dict]  # run folder, command, preset, --from folder, overrides


def add_common_arguments(p: argparse.ArgumentParser, seeds: list[int], out_help: str) -> None:
    """``--out``, ``--seeds`` (default ``seeds``), ``--table-only`` and ``--device``."""
    p.add_argument("--out", type=Path, required=True, help=out_help)
    p.add_argument("--seeds", type=parse_seeds, default=seeds)
    p.add_argument("--table-only", action="store_true", help="print the table of finished runs")
    p.add_argument("--device", default="auto")


def run_all(out: Path, runs: list[Run], seeds: list[int], device: str) -> None:
    """Each run over ``seeds``, in ``out/<run folder>/seed-N``; finished seeds are read back, so the
    same call continues an interrupted benchmark."""
    for folder, command, preset, source, overrides in runs:
        kw = {"from_dir": out / source} if source else {}
        supcon.run(
            command, preset, out / folder, overrides=overrides, resume=True, progress=False, seeds=seeds,
            device=device, **kw,
        )  # fmt: skip


def result_row(folder: Path, experiment: str) -> dict:
    """``experiment``'s row of a folder of seeds' ``results.json``, with the folder's ``seeds``; a
    missing row ends the benchmark with a line naming it."""
    agg = json.loads((folder / "results.json").read_text())
    row = next((r for r in agg["rows"] if r["experiment"] == experiment), None)
    if row is None:
        raise SystemExit(f"{folder}: no row {experiment!r}")
    return row | {"seeds": agg["seeds"]}
