"""A stop request (Ctrl-C, SIGTERM) during an image store build ends it at the next chunk, keeps its
``.partial`` folder, and the next build continues from there: a build of big data can take hours,
and a stop must not wait for it to end."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from _files import write_photos  # tests/ is on sys.path under pytest
from supcon.core.stop import Interrupted, StopFlag, stop_requested
from supcon.data import store as store_mod
from supcon.data.manifest import read_manifest
from supcon.data.store import open_store, store_dir

SIDE = 24


def _photos(root: Path, per_class: int = 6) -> Path:
    return write_photos(root, per_class, seed=3, sizes=(30, 70))


def _counting_jobs(monkeypatch, stop: StopFlag | None = None, after: int = 0) -> list[int]:
    """Chunks of 2 images; the chunks decoded are recorded, and ``stop`` is asked to stop once
    ``after`` of them are done (as a signal handler would set it)."""
    monkeypatch.setattr(store_mod, "_CHUNK", 2)
    real, decoded = store_mod._store_job, []

    def job(j):
        decoded.append(j[0])
        result = real(j)
        if stop is not None and len(decoded) == after:
            stop.requested = True
        return result

    monkeypatch.setattr(store_mod, "_store_job", job)
    return decoded


def _pixels(st) -> list[np.ndarray]:
    return [np.array(st.image(i)) for i in range(len(st))]


def test_stop_requested_sees_only_the_flags_entered_now():
    outer, other = StopFlag(), StopFlag()
    other.requested = True  # not entered: asks nothing of anyone
    assert not stop_requested()
    with outer:
        with outer:  # re-entered, as a repeat over seeds does
            assert not stop_requested()
            outer.requested = True
            assert stop_requested()
        assert stop_requested()  # the inner exit does not drop the request
    assert not stop_requested()


@pytest.mark.parametrize(("after", "workers"), [(1, 1), (4, 1), (2, 2)])
def test_a_stop_ends_the_build_at_a_chunk_and_the_next_build_resumes(tmp_path, monkeypatch, after, workers):
    m = read_manifest(_photos(tmp_path / "p"))
    cache = tmp_path / "c"
    want = _pixels(open_store(m, SIDE, cache_dir=tmp_path / "ref", progress=False, workers=1))
    final = store_dir(m, SIDE, cache)
    partial = final.with_name(final.name + ".partial")
    stop = StopFlag()
    decoded = _counting_jobs(monkeypatch, stop, after)
    with stop, pytest.raises(Interrupted) as e:
        open_store(m, SIDE, cache_dir=cache, progress=False, workers=workers)
    assert e.value.checkpoint == partial and not final.exists()
    n_chunks = (len(want) + 1) // 2
    assert after <= len(decoded) < n_chunks  # stopped long before the end; threads finish theirs
    recorded = set(np.flatnonzero(np.load(partial / "done.npy")).tolist())
    # Serially every decoded chunk is recorded; with threads, those still in flight at the stop
    # may not be (their writes are not trusted, so they are decoded again).
    assert recorded <= set(decoded) and len(recorded) >= (after if workers == 1 else 1)
    assert workers > 1 or recorded == set(decoded)
    decoded.clear()
    st = open_store(m, SIDE, cache_dir=cache, progress=False, workers=1)  # no stop asked now
    assert sorted(decoded) == sorted(set(range(n_chunks)) - recorded)  # recorded chunks are kept
    for got, ref in zip(_pixels(st), want, strict=True):
        np.testing.assert_array_equal(got, ref)
    assert not partial.exists()


def test_a_stop_while_image_sizes_are_read_keeps_the_build_folder(tmp_path, monkeypatch):
    m = read_manifest(_photos(tmp_path / "p", per_class=8))  # 24 images: 3 jobs of 8 sizes
    decoded = _counting_jobs(monkeypatch)
    final = store_dir(m, SIDE, tmp_path / "c")
    with StopFlag() as stop, pytest.raises(Interrupted):
        stop.requested = True  # asked before the build began: it ends at the first unit
        open_store(m, SIDE, cache_dir=tmp_path / "c", progress=False, workers=1)
    assert decoded == [] and final.with_name(final.name + ".partial").is_dir() and not final.exists()
    st = open_store(m, SIDE, cache_dir=tmp_path / "c", progress=False, workers=1)
    assert len(st) == 24 and len(decoded) == 12


_CLI = textwrap.dedent(
    """
    import os, signal, sys
    from supcon.data import store
    store._CHUNK = 2
    real, seen = store._store_job, []
    def job(j):  # SIGTERM to ourselves after the second chunk, as `kill` would send it
        seen.append(j[0])
        out = real(j)
        if len(seen) == 2 and os.environ.get("SEND_TERM"):
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    store._store_job = job
    from supcon.cli import main
    try:
        main(sys.argv[1:])
    finally:
        print("decoded", len(seen), file=sys.stderr)
    """
)


@pytest.mark.slow
def test_sigterm_during_a_build_ends_the_command_cleanly_and_the_printed_command_resumes(tmp_path):
    data, out, cache = _photos(tmp_path / "p"), tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "SUPCON_DATA": str(cache), "SEND_TERM": "1"}
    args = ["compare", "--data", str(data), "--image-size", "64", "--epochs", "1", "--quiet"]
    args += ["--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", _CLI, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("decoded")]
    assert len(lines) == 1 and lines[0].startswith("stopped: progress saved in "), proc.stderr
    assert ".partial" in lines[0] and f"supcon compare --resume --out {out}" in lines[0]
    assert "decoded 2" in proc.stderr  # not one chunk more than the stop allowed
    assert list((cache / "store").glob("*.partial")) and not (out / "results.json").exists()
    resume = lines[0].split("continue with: supcon ")[1].split()
    env.pop("SEND_TERM")
    proc = subprocess.run(
        [sys.executable, "-c", _CLI, *resume], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "decoded 7" in proc.stderr  # the 7 chunks left of 9, none again
    assert (out / "results.json").is_file() and not list((cache / "store").glob("*.partial"))
