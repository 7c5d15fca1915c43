"""The run loop the accuracy benchmarks share (longtail.py, small_batch.py, keras_seeds.py)."""

from __future__ import annotations

from pathlib import Path

import supcon

Run = tuple[str, str, str | None, str | None, dict]  # run folder, command, preset, --from folder, overrides


def run_all(out: Path, runs: list[Run], seeds: list[int], device: str) -> None:
    """Each run over ``seeds``, in ``out/<run folder>/seed-N``; finished seeds are read back, so the
    same call continues an interrupted benchmark."""
    for folder, command, preset, source, overrides in runs:
        kw = {"from_dir": out / source} if source else {}
        supcon.run(
            command, preset, out / folder, overrides=overrides, resume=True, progress=False, seeds=seeds,
            device=device, **kw,
        )  # fmt: skip
