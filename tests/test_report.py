"""Report: the curves' panels, plots that cannot be drawn, odd class names, and notes in the report."""

import json

import numpy as np
import pytest

from supcon.report import curve_panels, display_name, plot_curves, plot_tsne, write_report

TRAIN_ONLY = [
    {"phase": "ce", "epoch": 1, "loss": 2.0, "train_acc": 0.3},
    {"phase": "ce", "epoch": 2, "loss": 1.5, "train_acc": 0.5},
]
WITH_HELD_OUT = [
    *TRAIN_ONLY,
    {"phase": "pretrain", "epoch": 1, "loss": 5.0},
    {"phase": "pretrain", "epoch": 2, "loss": 4.0, "val_knn_acc": 0.6},
    {"phase": "linear", "epoch": 1, "loss": 1.0, "train_acc": 0.7, "val_acc": 0.65},
]


def test_curves_without_held_out_metrics_have_two_panels(tmp_path):
    assert curve_panels(TRAIN_ONLY) == ["training loss", "training accuracy"]
    path = plot_curves(TRAIN_ONLY, tmp_path / "c.png")
    assert path == tmp_path / "c.png" and path.stat().st_size > 0


def test_curves_with_knn_monitor_and_probe_accuracy_get_a_third_panel(tmp_path):
    panels = curve_panels(WITH_HELD_OUT)
    assert len(panels) == 3 and panels[2].startswith("held-out accuracy")
    assert plot_curves(WITH_HELD_OUT, tmp_path / "c.png").is_file()


def test_no_metrics_no_plot(tmp_path):
    assert curve_panels([]) == []
    assert plot_curves([], tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()


def test_curves_that_cannot_be_written_give_a_reason(tmp_path):
    why = plot_curves(TRAIN_ONLY, tmp_path / "missing" / "c.png")
    assert isinstance(why, str) and why.startswith("training curves not drawn: FileNotFoundError")
    assert "\n" not in why


def test_curves_tolerate_rows_without_some_keys(tmp_path):
    metrics = [*TRAIN_ONLY, {"phase": "ce", "epoch": 3}, {"phase": "pretrain", "loss": 1.0}]
    assert plot_curves(metrics, tmp_path / "c.png").is_file()


def _features(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize("n", [0, 1, 3, 5, 9])
def test_tsne_of_too_few_images_gives_a_reason(tmp_path, n):
    why = plot_tsne({"ce": _features(n)}, np.zeros(n, dtype=np.int64), ["a", "b"], tmp_path / "t.png")
    images = "image" if n == 1 else "images"
    assert why == f"t-SNE map not drawn: only {n} test {images} (it needs at least 10)"
    assert not (tmp_path / "t.png").exists()


def test_tsne_of_non_finite_features_gives_a_reason(tmp_path):
    feats = _features(20)
    feats[3, 1] = np.nan
    why = plot_tsne({"ce": feats}, np.zeros(20, dtype=np.int64), ["a", "b"], tmp_path / "t.png")
    assert why == "t-SNE map not drawn: the features contain NaN or infinite values"


def test_tsne_draws_the_smallest_allowed_set_and_odd_class_names(tmp_path):
    classes = ["$\\foo$", "x$^$y", "_hidden", "bell\x07\ttab", "n" * 500, "\U0001f600 grin", "a$b", ""]
    n = 10
    labels = np.arange(n) % len(classes)
    maps = {"ce": _features(n), "$supcon$": _features(n, seed=1)}
    assert plot_tsne(maps, labels, classes, tmp_path / "t.png", seed=0) == tmp_path / "t.png"
    assert (tmp_path / "t.png").stat().st_size > 0


def test_display_name():
    assert display_name("a$b") == r"a\$b"
    assert display_name("$\\foo$") == r"\$\foo\$"
    assert display_name("_x") == " _x"  # legends skip labels that start with "_"
    assert display_name("bell\x07\ttab\nnew") == "bell tab new"
    assert display_name("") == "?"
    long = display_name("n" * 500)
    assert len(long) == 40 and long.endswith("\u2026")
    assert display_name("\U0001f600 grin") == "\U0001f600 grin"


def test_report_lists_notes_and_plots_that_were_not_drawn(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps({**m, "seconds": 1.0}) for m in TRAIN_ONLY))
    curves = plot_curves(TRAIN_ONLY, tmp_path / "curves.png")
    tsne = plot_tsne({"ce": _features(3)}, np.zeros(3, dtype=np.int64), ["a", "b"], tmp_path / "tsne.png")
    rows = [{"experiment": "ce", "test_acc": 0.5, "train_seconds": 1.0}]
    path = write_report(tmp_path, "T", ["- s"], rows, [curves, tsne], notes=["a note\nover two lines"])
    text = path.read_text()
    assert "![curves](curves.png)" in text and "tsne.png" not in text
    assert "## Notes\n\n- t-SNE map not drawn: only 3 test images (it needs at least 10)\n" in text
    assert "- a note over two lines\n" in text
