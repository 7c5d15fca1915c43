"""Report: the curves' panels, plots that cannot be drawn, odd class names, and notes in the report."""

import json

import numpy as np
import pytest

from supcon.evaluation.plots import curve_panels, display_name, plot_curves, plot_tsne
from supcon.evaluation.report import write_report

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


def test_tsne_of_constant_features_gives_a_reason(tmp_path):
    feats = np.ones((20, 4), dtype=np.float32)
    why = plot_tsne(
        {"ce": _features(20), "dead": feats}, np.zeros(20, dtype=np.int64), ["a"], tmp_path / "t.png"
    )
    assert why == "t-SNE map not drawn: an encoder gives every image the same features"
    assert not (tmp_path / "t.png").exists()


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


def test_confusion_matrix_is_normalised_per_true_class():
    from sklearn.metrics import confusion_matrix as sk_confusion

    from supcon.evaluation.report import confusion_matrix

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    m = confusion_matrix(pred, y, 5)  # class 4 has no test image: a row of zeros
    assert m.shape == (5, 5)
    np.testing.assert_allclose(m[:4, :4], sk_confusion(y, pred, labels=range(4), normalize="true"))
    assert not m[4].any() and not m[:, 4].any()
    np.testing.assert_allclose(m[:4].sum(1), 1.0)


def test_confusion_plot_labels_up_to_twenty_classes(tmp_path):
    from supcon.evaluation.plots import confusion_tick_labels, plot_confusion
    from supcon.evaluation.report import confusion_matrix

    assert confusion_tick_labels([str(i) for i in range(20)]) == [str(i) for i in range(20)]
    assert confusion_tick_labels([str(i) for i in range(21)]) == []
    assert confusion_tick_labels(["a$b", "n" * 30])[0] == r"a\$b"
    for n in (3, 40):
        y = np.arange(n).repeat(2)
        m = confusion_matrix(y[::-1], y, n)
        assert (
            plot_confusion(m, [f"c{i}" for i in range(n)], tmp_path / f"c{n}.png", "ce")
            == tmp_path / f"c{n}.png"
        )
    why = plot_confusion(np.zeros((3, 3)), ["a", "b", "c"], tmp_path / "z.png", "ce")
    assert why == "confusion matrix of ce not drawn: no test predictions"


def _tiles(n: int, size: int = 8) -> np.ndarray:
    """n distinct uint8 images [n, size, size, 3]: image i is filled with the value 10 * i + 5."""
    return (
        (np.arange(n, dtype=np.uint8)[:, None, None, None] * 10 + 5)
        .repeat(size, 1)
        .repeat(size, 2)
        .repeat(3, 3)
    )


def test_retrieval_mosaic_frames_wrong_neighbours_red():
    from supcon.evaluation.plots import FRAME_QUERY, FRAME_RIGHT, FRAME_WRONG, retrieval_mosaic

    gallery_x, gallery_y = _tiles(10), np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0])
    query_x, query_y = _tiles(2, 16), np.array([0, 2])
    neighbours = np.array([[0, 2, 6], [4, 5, 9]])
    img, wrong, boxes = retrieval_mosaic(
        query_x, query_y, gallery_x, gallery_y, neighbours, tile=20, border=2
    )
    np.testing.assert_array_equal(wrong, [[False, True, False], [False, False, True]])
    assert boxes.shape == (2, 4, 4) and img.dtype == np.uint8 and img.shape[2] == 3
    for r in range(2):
        for c in range(4):
            top, left, bottom, right = boxes[r, c]
            assert bottom - top == right - left == 24
            frame = FRAME_QUERY if c == 0 else FRAME_WRONG if wrong[r, c - 1] else FRAME_RIGHT
            assert tuple(img[top, left]) == frame and tuple(img[bottom - 1, right - 1]) == frame
            inside = img[top + 2 : bottom - 2, left + 2 : right - 2]
            want = query_x[r, 0, 0, 0] if c == 0 else gallery_x[neighbours[r, c - 1], 0, 0, 0]
            assert inside.shape == (20, 20, 3) and (inside == want).all()
    # cells do not overlap
    flat = boxes.reshape(-1, 4)
    for a in range(len(flat)):
        for b in range(a + 1, len(flat)):
            t1, l1, b1, r1 = flat[a]
            t2, l2, b2, r2 = flat[b]
            assert b1 <= t2 or b2 <= t1 or r1 <= l2 or r2 <= l1


def test_retrieval_panel_is_drawn_or_says_why(tmp_path):
    from supcon.evaluation.plots import plot_retrieval

    gallery_x, gallery_y = _tiles(10), np.arange(10) % 3
    query_x, query_y = _tiles(2), np.array([0, 1])
    panels = {"ce": np.array([[0, 3, 1], [1, 4, 2]]), "$supcon$": np.array([[3, 6, 9], [2, 5, 8]])}
    path = plot_retrieval(
        panels, query_x, query_y, gallery_x, gallery_y, ["a", "_b", "c$"], tmp_path / "r.png"
    )
    assert path == tmp_path / "r.png" and path.stat().st_size > 0
    empty = plot_retrieval(panels, query_x[:0], query_y[:0], gallery_x, gallery_y, ["a"], tmp_path / "e.png")
    assert empty == "retrieval panel not drawn: no queries"


def test_retrieval_section_and_eval_text():
    from supcon.evaluation.report import evaluation_text, retrieval_section

    metrics = {"precision@1": 0.5, "r_precision": float("nan"), "map@r": 0.25, "recall@1": 0.5, "knn@20": 1.0}
    block = {"queries": "the 4 test images", "gallery": "the 9 training images", "features": "f",
             "encoders": {"ce encoder": metrics}}  # fmt: skip
    lines = retrieval_section("Retrieval", block)
    assert lines[0] == "## Retrieval"
    table_rows = [line for line in "\n".join(lines).splitlines() if line.startswith("| ce encoder")]
    assert [c.strip() for c in table_rows[0].split("|")[1:-1]] == [
        "ce encoder",
        "50.00",
        "n/a",
        "25.00",
        "50.00",
        "100.00",
    ]
    text = evaluation_text({"rows": [{"experiment": "cross-entropy", "test_acc": 0.5}], "retrieval": block})
    assert text.splitlines()[0] == "cross-entropy: 50.00%"
    assert "retrieval: the 4 test images against the 9 training images" in text


def test_report_has_the_given_sections(tmp_path):
    rows = [{"experiment": "ce", "test_acc": 0.5, "train_seconds": 1.0}]
    text = write_report(tmp_path, "T", [], rows, [], sections=["## Retrieval", "", "| x |", ""]).read_text()
    assert "## Retrieval\n\n| x |\n" in text
