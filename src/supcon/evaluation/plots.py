"""The report's PNG plots: training curves, t-SNE maps, retrieval panels, confusion matrices and
the grid of augmented views. Each plot function returns the file's path, or when it could not be
drawn a one-line reason for the report: a plot is never worth losing a run's report.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from supcon.core.files import matplotlib_outside_missing_home

# Before matplotlib's import: it would create ~/.cache and ~/.config under a home that does not exist.
matplotlib_outside_missing_home()
import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from supcon.data.augment import AugmentConfig, BatchAugment, to_float_nchw  # noqa: E402
from supcon.evaluation.report import PHASE_TITLES  # noqa: E402

FRAME_QUERY, FRAME_RIGHT, FRAME_WRONG = (40, 90, 200), (0, 150, 60), (220, 0, 0)


HELD_OUT = {
    "val_acc": "validation accuracy",
    "val_knn_acc": "kNN monitor (validation)",
    "monitor_knn_acc": "kNN monitor (test)",
}


def curve_panels(metrics: list[dict]) -> list[str]:
    """The titles of ``plot_curves``' panels for ``metrics`` (none: nothing to plot)."""
    if not any(m.get("phase") in PHASE_TITLES for m in metrics):
        return []
    panels = ["training loss", "training accuracy"]
    if any(k in m for m in metrics for k in HELD_OUT):
        panels.append("held-out accuracy (validation split / kNN monitor)")
    return panels


def plot_curves(metrics: list[dict], path: Path) -> Path | str | None:
    """Per epoch, one line per phase: training loss, training accuracy, and (when logged) held-out
    accuracy: the classifiers' validation accuracy and the kNN monitor of pre-training.

    Returns the PNG's path; None when there is nothing to plot; or, when it could not be drawn, a
    one-line reason for the report ("training curves not drawn: ...").
    """
    panels = curve_panels(metrics)
    if not panels:
        return None
    try:
        _draw_curves(metrics, panels, path)
    except Exception as e:  # a plot is never worth losing the run's report
        plt.close("all")
        return f"training curves not drawn: {_why(e)}"
    return path


def _draw_curves(metrics: list[dict], panels: list[str], path: Path) -> None:
    phases = [p for p in PHASE_TITLES if any(m.get("phase") == p for m in metrics)]
    held_out = len(panels) == 3
    fig, axes = plt.subplots(1, len(panels), figsize=(17 if held_out else 12, 4.5))
    ax_loss, ax_acc = axes[0], axes[1]
    for i, phase in enumerate(phases):
        color = f"C{i}"  # one colour per phase in every panel
        rows = [m for m in metrics if m.get("phase") == phase]
        series = [(ax_loss, "loss", "loss"), (ax_acc, "train_acc", "train accuracy")]
        if held_out:
            series += [(axes[2], key, name) for key, name in HELD_OUT.items()]
        for ax, key, name in series:
            vals = [(m["epoch"], m[key]) for m in rows if key in m and "epoch" in m]
            if vals:
                ax.plot(
                    *zip(*vals, strict=True),
                    color=color,
                    linestyle=":" if "knn" in key else "-",
                    marker="." if len(vals) < 30 else None,
                    label=f"{phase} loss" if key == "loss" else f"{phase}: {name}",
                )
    for ax, title in zip(axes, panels, strict=True):
        ylabel = "loss" if ax is ax_loss else "accuracy"
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# t-SNE of fewer points says nothing (and below perplexity + 1 points it cannot run at all).
TSNE_MIN_POINTS = 10


def plot_tsne(
    maps: dict[str, np.ndarray], labels: np.ndarray, classes: list[str], path: Path, seed: int = 0
) -> Path | str:
    """Side-by-side 2-D t-SNE maps of test features, one panel per encoder.

    Returns the PNG's path, or a one-line reason it was not drawn, for the report
    ("t-SNE map not drawn: only 3 test images (it needs at least 10)").
    """
    n = min((len(f) for f in maps.values()), default=0)
    if not maps:
        return "t-SNE map not drawn: no encoder features"
    if n < TSNE_MIN_POINTS:
        images = f"{n} test image" + ("s" if n != 1 else "")
        return f"t-SNE map not drawn: only {images} (it needs at least {TSNE_MIN_POINTS})"
    if not all(np.isfinite(f).all() for f in maps.values()):
        return "t-SNE map not drawn: the features contain NaN or infinite values"
    if any(len(f) > 1 and np.ptp(f, axis=0).max() == 0 for f in maps.values()):
        # scikit-learn's TSNE divides by the spread and can crash the process on constant input.
        return "t-SNE map not drawn: an encoder gives every image the same features"
    try:
        _draw_tsne(maps, labels, classes, path, seed)
    except Exception as e:  # a plot is never worth losing the run's report
        plt.close("all")
        return f"t-SNE map not drawn: {_why(e)}"
    return path


# Optimisation steps of the t-SNE map: 250 of early exaggeration, then 250 more. scikit-learn's
# default of 1000 took 5.3 s for 2,000 points on the 2-core CPU, 500 took 2.8 s; openTSNE (not a
# dependency) took 3.7 s.
TSNE_STEPS = 500


def _tsne_steps() -> dict:
    """The step limit under the name this scikit-learn takes (``n_iter`` before 1.5)."""
    import inspect

    from sklearn.manifold import TSNE

    name = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"
    return {name: TSNE_STEPS}


def _draw_tsne(
    maps: dict[str, np.ndarray], labels: np.ndarray, classes: list[str], path: Path, seed: int
) -> None:
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(maps), figsize=(6.2 * len(maps), 6), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for ax, (title, feats) in zip(axes[0], maps.items(), strict=True):
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        perplexity = float(min(30, max(5, (len(feats) - 1) // 3)))
        xy = TSNE(
            n_components=2, init="pca", perplexity=perplexity, random_state=seed, **_tsne_steps()
        ).fit_transform(feats)
        for c in range(len(classes)):
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(c % cmap.N), label=display_name(classes[c]))
        ax.set_title(display_name(title, 80))
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:
        axes[0][-1].legend(markerscale=4, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Beyond this many classes, tick labels would overlap: the matrix is drawn without them.
CONFUSION_MAX_LABELS = 20


def confusion_tick_labels(classes: list[str]) -> list[str]:
    """The axis labels of a confusion matrix: the class names, none beyond CONFUSION_MAX_LABELS."""
    return [display_name(c, 16) for c in classes] if len(classes) <= CONFUSION_MAX_LABELS else []


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> Path | str:
    """A confusion matrix (``confusion_matrix``) as a heat map, shares written in the cells up to
    CONFUSION_MAX_LABELS classes. Returns the PNG's path, or a one-line reason it was not drawn."""
    if matrix.size == 0 or not matrix.any():
        return f"confusion matrix of {title} not drawn: no test predictions"
    try:
        _draw_confusion(matrix, classes, path, title)
    except Exception as e:  # a plot is never worth losing the run's report
        plt.close("all")
        return f"confusion matrix of {title} not drawn: {_why(e)}"
    return path


def _draw_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    n = len(matrix)
    labels = confusion_tick_labels(classes)
    side = 4.5 + (0.3 * n if labels else 2.0)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if labels:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        for i, j in zip(*np.nonzero(matrix >= 0.005), strict=True):
            color = "white" if matrix[i, j] > 0.5 else "black"
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set(xlabel="predicted class", ylabel="true class", title=f"{display_name(title, 60)}: test set")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def retrieval_mosaic(
    query_x: np.ndarray,
    query_y: np.ndarray,
    gallery_x: np.ndarray,
    gallery_y: np.ndarray,
    neighbours: np.ndarray,
    tile: int = 48,
    border: int = 3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per query: the query (framed blue), a gap, then its neighbours in order, framed green
    when they share its label and red when not.

    ``query_x`` [Q, H, W, C] and ``gallery_x`` uint8 images, ``neighbours`` [Q, k] gallery indices.
    Returns the image [rows, cols, 3] uint8 (white background), ``wrong`` [Q, k] bool (red frames),
    and ``boxes`` [Q, k + 1, 4] (top, left, bottom, right; bottom/right exclusive) of each framed
    cell, the query's first.
    """
    from PIL import Image

    q, k = neighbours.shape
    cell, gap, caption = tile + 2 * border, 6, 16
    wrong = gallery_y[neighbours] != query_y[:, None]
    boxes = np.zeros((q, k + 1, 4), dtype=np.int64)
    for r in range(q):
        for c in range(k + 1):
            top, left = r * (cell + caption), c * (cell + gap) + (3 * gap if c else 0)
            boxes[r, c] = (top, left, top + cell, left + cell)
    out = np.full((q * (cell + caption), int(boxes[..., 3].max()), 3), 255, dtype=np.uint8)

    def paste(img: np.ndarray, box: np.ndarray, frame: tuple[int, int, int]) -> None:
        img = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]
        small = np.asarray(Image.fromarray(img).resize((tile, tile), Image.NEAREST))
        top, left, bottom, right = box
        out[top:bottom, left:right] = frame
        out[top + border : bottom - border, left + border : right - border] = small

    for r in range(q):
        paste(query_x[r], boxes[r, 0], FRAME_QUERY)
        for c in range(k):
            paste(gallery_x[neighbours[r, c]], boxes[r, c + 1], FRAME_WRONG if wrong[r, c] else FRAME_RIGHT)
    return out, wrong, boxes


def plot_retrieval(
    panels: dict[str, np.ndarray],
    query_x: np.ndarray,
    query_y: np.ndarray,
    gallery_x: np.ndarray,
    gallery_y: np.ndarray,
    classes: list[str],
    path: Path,
) -> Path | str:
    """Side by side, one panel per encoder (``panels``: name -> neighbours [Q, k] into the gallery):
    the same queries with their nearest gallery images (``retrieval_mosaic``), class names as
    captions. Returns the PNG's path, or a one-line reason it was not drawn."""
    if not panels or not len(query_y):
        return "retrieval panel not drawn: no queries"
    if not all(n.size for n in panels.values()):
        return "retrieval panel not drawn: the gallery is empty"
    try:
        _draw_retrieval(panels, query_x, query_y, gallery_x, gallery_y, classes, path)
    except Exception as e:  # a plot is never worth losing the run's report
        plt.close("all")
        return f"retrieval panel not drawn: {_why(e)}"
    return path


def _draw_retrieval(panels, query_x, query_y, gallery_x, gallery_y, classes, path) -> None:
    mosaics = {
        name: retrieval_mosaic(query_x, query_y, gallery_x, gallery_y, nn) for name, nn in panels.items()
    }
    h, w = next(iter(mosaics.values()))[0].shape[:2]
    dpi = 100
    fig, axes = plt.subplots(
        1, len(mosaics), figsize=(len(mosaics) * (w + 40) / dpi, (h + 60) / dpi), squeeze=False
    )
    for ax, (name, (img, _, boxes)) in zip(axes[0], mosaics.items(), strict=True):
        ax.imshow(img, interpolation="nearest")
        for r in range(len(boxes)):
            labels = [query_y[r], *gallery_y[panels[name][r]]]
            for (_, left, bottom, right), y in zip(boxes[r], labels, strict=True):
                ax.text(
                    (left + right) / 2,
                    bottom + 1,
                    display_name(classes[int(y)], 10),
                    ha="center",
                    va="top",
                    fontsize=6,
                )
        ax.set_title(
            f"{display_name(name, 60)}: query | nearest training images (red: other class)", fontsize=8
        )
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def display_name(name: object, limit: int = 40) -> str:
    """``name`` as matplotlib shows it literally: ``$`` escaped (mathtext), control characters
    dropped, a leading ``_`` kept visible (legends hide such labels), at most ``limit`` characters."""
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in str(name))
    text = " ".join(text.split()) or "?"
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    if text.startswith("_"):
        text = " " + text
    return text.replace("$", r"\$")


def _why(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def save_view_grid(
    x_uint8: torch.Tensor,
    path: str | Path,
    views: int = 4,
    n: int = 8,
    augment: BatchAugment | AugmentConfig | None = None,
    generator: torch.Generator | None = None,
    seed: int = 0,
    zoom: int = 3,
    pad: int = 2,
    crops: torch.Tensor | None = None,
) -> Path:
    """Write a PNG: one row per image (the first ``n``), the original then ``views`` augmented views.

    Views are shown before normalization (the config's ``normalize`` is switched off for the picture),
    each tile enlarged ``zoom`` times with nearest-neighbour so small images stay legible. ``crops``:
    the views already cropped (uint8 ``[views * n, S, S, C]``, view-major; stored images), which the
    augmentation then only flips and colours.
    """
    from PIL import Image

    if isinstance(augment, AugmentConfig) or augment is None:
        augment = BatchAugment(augment)
    shown = BatchAugment(augment.config, normalize=False)
    x = x_uint8[:n]
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        orig = to_float_nchw(x.cpu())
        if crops is not None:
            aug = shown(crops.cpu(), views=1, generator=generator)
        else:
            aug = shown(x.cpu(), views=views, generator=generator)
    B, C, H, W = orig.shape
    S, T = aug.shape[2:]
    th, tw = max(H, S), max(W, T)
    cols = views + 1
    canvas = torch.ones(C, B * (th + pad) + pad, cols * (tw + pad) + pad + pad)
    for b in range(B):
        y0 = pad + b * (th + pad)
        canvas[:, y0 : y0 + H, pad : pad + W] = orig[b]
        for v in range(views):
            # An extra gap separates the original from its views.
            x0 = 2 * pad + (v + 1) * (tw + pad)
            canvas[:, y0 : y0 + S, x0 : x0 + T] = aug[v * B + b]
    arr = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2).permute(1, 2, 0)
    arr = arr[..., 0] if C == 1 else arr
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.contiguous().numpy()).save(path)
    return path
