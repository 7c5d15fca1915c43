"""Report plots: the curves gain a held-out panel when validation or kNN metrics were logged."""

from PIL import Image

from supcon.report import plot_curves

TRAIN_ONLY = [
    {"phase": "ce", "epoch": 1, "loss": 2.0, "train_acc": 0.3},
    {"phase": "ce", "epoch": 2, "loss": 1.5, "train_acc": 0.5},
]


def test_curves_without_held_out_metrics_have_two_panels(tmp_path):
    path = plot_curves(TRAIN_ONLY, tmp_path / "c.png")
    w, h = Image.open(path).size
    assert 2.4 < w / h < 2.9  # 12 x 4.5 inches


def test_curves_with_knn_monitor_and_probe_accuracy_get_a_third_panel(tmp_path):
    metrics = [
        *TRAIN_ONLY,
        {"phase": "pretrain", "epoch": 1, "loss": 5.0},
        {"phase": "pretrain", "epoch": 2, "loss": 4.0, "val_knn_acc": 0.6},
        {"phase": "linear", "epoch": 1, "loss": 1.0, "train_acc": 0.7, "val_acc": 0.65},
    ]
    path = plot_curves(metrics, tmp_path / "c.png")
    w, h = Image.open(path).size
    assert 3.5 < w / h < 4.0  # 17 x 4.5 inches


def test_no_metrics_no_plot(tmp_path):
    assert plot_curves([], tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()
