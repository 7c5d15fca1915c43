"""The package's layers hold: what a light import pulls in, what using a trained run pulls in, and no
import cycle (the arrows between packages are checked by import-linter in ``make lint``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tests._trained import trained_run

TRAINING = ("supcon.train", "supcon.runs.open", "supcon.runs.seeds", "supcon.experiments", "supcon.driver")


def _modules_after(code: str) -> list[str]:
    """The modules loaded in a fresh interpreter after ``code`` runs."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_supcon_is_light():
    loaded = _modules_after("import supcon")
    assert "torch" not in loaded and "numpy" not in loaded
    assert [m for m in loaded if m.startswith("supcon.")] == []


def test_the_loss_alone_imports_no_data_models_or_training():
    loaded = _modules_after("from supcon import supcon_loss")
    assert "supcon.losses.supcon" in loaded
    assert not [m for m in loaded if m.startswith(("supcon.data", "supcon.models", "supcon.train"))]


@pytest.mark.slow
def test_load_and_embed_import_no_training_module(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    loaded = _modules_after(
        "import numpy as np, supcon\n"
        f"m = supcon.load({str(run)!r}, device='cpu')\n"
        "e = m.embed(np.zeros((2, 8, 8, 3), dtype=np.uint8))\n"
        "assert e.shape[0] == 2"
    )
    assert "supcon.serve.inference" in loaded
    assert [m for m in loaded if m.startswith(TRAINING)] == []


def test_no_import_cycles():
    grimp = pytest.importorskip("grimp")  # installed with import-linter (the dev extra)
    graph = grimp.build_graph("supcon", cache_dir=None)
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    # Tarjan's strongly connected components: a component of more than one module is a cycle.
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in modules:
        if m not in index:
            visit(m)
    # A package's __init__ that names its children is not a cycle of concepts; none do here.
    assert cycles == [], json.dumps(cycles, indent=1)
