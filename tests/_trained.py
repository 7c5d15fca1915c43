"""One tiny trained digits run (all three phases, a projection head, normalised inputs) shared by the
tests of supcon.load, embed and export in one pytest process. Tests must not write into it: those
that need another run folder copy it."""

from __future__ import annotations

from pathlib import Path

import pytest

import supcon

OVERRIDES = {
    "data.dataset": "digits",
    "data.normalize": True,
    "model.projection": "mlp",
    "model.projection_dim": 32,
    "precision": "fp32",
    "ce.epochs": 1,
    "pretrain.epochs": 1,
    "linear.epochs": 1,
}
_RUNS: dict[str, Path] = {}


def trained_run(tmp_path_factory) -> Path:
    if "run" not in _RUNS:
        out = tmp_path_factory.mktemp("trained") / "run"
        with pytest.MonkeyPatch.context() as mp:
            # The report's t-SNE map takes most of such a run (a minute on a busy CPU) and is not
            # what these tests read: its file is left out.
            mp.setattr(
                "supcon.evaluation.retrieval_report.plot_tsne", lambda maps, y, classes, path, seed: path
            )
            supcon.run("compare", out=out, overrides=OVERRIDES, progress=False)
        _RUNS["run"] = out
    return _RUNS["run"]


def run_data():
    """The run's dataset, loaded as training loaded it."""
    from supcon.core.config import Config, set_values
    from supcon.data.datasets import load_split

    cfg = Config()
    set_values(cfg, OVERRIDES)
    return load_split(cfg.data, cfg.seed, progress=False)[0]


def digits_test_images(n: int):
    """uint8 [n, 16, 16, 3] test images and labels of the run's dataset."""
    data = run_data()
    return data.test_x[:n], data.test_y[:n]
