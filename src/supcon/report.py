"""Run reports: the terminal tables, a Markdown report, and PNG plots (curves, t-SNE maps, retrieval
panels, confusion matrices)."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from supcon.rundir import read_metrics  # noqa: E402

PHASE_TITLES = {
    "ce": "Experiment 1: cross-entropy (encoder + classifier)",
    "pretrain": "Experiment 2a: contrastive pre-training",
    "linear": "Experiment 2b: classifier on the frozen encoder",
}


# Multi-label rows (supcon.multilabel): their metric keys and column titles, in place of test_acc.
MULTILABEL_COLUMNS = {"map": "mAP", "micro_f1": "micro-F1", "macro_f1": "macro-F1"}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def metric_text(row: dict) -> str:
    """A row's test metric in words: ``91.20%``, or ``mAP 45.10%, micro-F1 ..., macro-F1 ...``."""
    if "map" in row:
        return ", ".join(f"{title} {_pct(row.get(k))}" for k, title in MULTILABEL_COLUMNS.items())
    return _pct(row["test_acc"])


def table(rows: list[dict]) -> str:
    """Rows of {experiment, test_acc, train_seconds, ...} as an aligned text/Markdown table (multi-label
    rows: mAP, micro-F1 and macro-F1 in place of the accuracy)."""
    keys = list(MULTILABEL_COLUMNS) if any("map" in r for r in rows) else ["test_acc"]
    titles = [MULTILABEL_COLUMNS.get(k, "test accuracy") for k in keys]
    head = ["experiment", *titles, "train time", "s/epoch"]
    body = [
        [
            r["experiment"],
            *(_pct(r.get(k)) for k in keys),
            f"{r['train_seconds']:.1f} s",
            " + ".join(f"{s:.2f}" for s in r.get("epoch_seconds", [])),
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    lines = [fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt.format(*b) for b in body]
    return "\n".join(lines)


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


def _draw_tsne(
    maps: dict[str, np.ndarray], labels: np.ndarray, classes: list[str], path: Path, seed: int
) -> None:
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(maps), figsize=(6.2 * len(maps), 6), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for ax, (title, feats) in zip(axes[0], maps.items(), strict=True):
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        perplexity = float(min(30, max(5, (len(feats) - 1) // 3)))
        xy = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(feats)
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


RETRIEVAL_COLUMNS = {
    "precision@1": "P@1",
    "r_precision": "R-precision",
    "map@r": "MAP@R",
    "recall@1": "R@1",
    "recall@5": "R@5",
    "recall@10": "R@10",
    "knn@20": "kNN@20",
    "knn@200": "kNN@200",
}


def retrieval_table(metrics: dict[str, dict[str, float]]) -> str:
    """``{encoder: retrieval_metrics(...)}`` as an aligned text/Markdown table, in percent (NaN: n/a)."""
    keys = list(dict.fromkeys(k for m in metrics.values() for k in m))
    head = ["encoder", *(RETRIEVAL_COLUMNS.get(k, k) for k in keys)]
    body = [
        [name, *(f"{100 * m[k]:.2f}" if np.isfinite(m.get(k, np.nan)) else "n/a" for k in keys)]
        for name, m in metrics.items()
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    lines = [fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + [fmt.format(*b) for b in body])


def retrieval_section(heading: str, block: dict) -> list[str]:
    """Markdown lines for a retrieval block (``experiments.retrieval_block``): what was searched, a table."""
    return [
        f"## {heading}",
        "",
        f"Queries: {block['queries']}; gallery: {block['gallery']}; {block['features']}. "
        "P@1, R-precision and MAP@R as pytorch-metric-learning's AccuracyCalculator (queries without "
        "a relevant gallery item left out); R@k: any of the k nearest shares the label; kNN@k: weighted "
        f"vote exp(sim / {block.get('knn_temperature', 0.07)}). Values in percent.",
        "",
        retrieval_table(block["encoders"]),
        "",
    ]


def evaluation_text(results: dict) -> str:
    """``supcon eval``'s output: one line per model, then the retrieval tables."""
    lines = [f"{r['experiment']}: {metric_text(r)}" for r in results["rows"]]
    for key, heading in (("retrieval", "retrieval"), ("retrieval_open_set", "open-set retrieval")):
        if key in results:
            block = results[key]
            lines += ["", f"{heading}: {block['queries']} against {block['gallery']} (percent)"]
            lines.append(retrieval_table(block["encoders"]))
    return "\n".join(lines)


# Beyond this many classes, tick labels would overlap: the matrix is drawn without them.
CONFUSION_MAX_LABELS = 20


def confusion_matrix(pred: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C]: row = true class, column = predicted class, each row normalised to sum 1 (the share of
    that class's images given each prediction); a class without images has a row of zeros."""
    counts = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(counts, (np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1.0)
    return counts / np.maximum(counts.sum(1, keepdims=True), 1.0)


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


FRAME_QUERY, FRAME_RIGHT, FRAME_WRONG = (40, 90, 200), (0, 150, 60), (220, 0, 0)


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


def ap_lines(rows: list[dict]) -> list[str]:
    """The report's per-class average precision table of multi-label rows (none: no lines)."""
    rows = [r for r in rows if r.get("ap_per_class")]
    if not rows:
        return []
    classes = list(rows[0]["ap_per_class"])
    head = "| class | " + " | ".join(r["experiment"] for r in rows) + " |"
    lines = ["### Average precision per class", "", head, "|" + "---|" * (len(rows) + 1)]
    lines += [f"| {c} | " + " | ".join(_pct(r["ap_per_class"].get(c)) for r in rows) + " |" for c in classes]
    skipped = rows[0].get("classes_skipped", 0)
    if skipped:
        why = "have no AP (n/a) and are left out of the mAP"
        lines += ["", f"{skipped} class(es) with no positive test image {why}."]
    return lines + [""]


def write_report(
    run_dir: Path,
    title: str,
    summary: list[str],
    rows: list[dict],
    images: list[Path | str],
    notes: list[str] | None = None,
    sections: list[str] | None = None,
) -> Path:
    """``report.md`` in ``run_dir``. ``images`` may hold, in place of a plot, the reason it was not
    drawn (what ``plot_tsne`` and ``plot_curves`` return then); these and ``notes`` are listed as notes.
    ``sections``: Markdown lines after the results (e.g. ``retrieval_section``).
    """
    notes = [*(i for i in images if isinstance(i, str)), *(notes or [])]
    images = [i for i in images if not isinstance(i, str)]
    lines = [f"# {title}", ""]
    lines += summary + ["", "## Results", "", table(rows), ""]
    lines += ap_lines(rows)
    metrics = read_metrics(run_dir)
    for phase, heading in PHASE_TITLES.items():
        rows_p = [m for m in metrics if m["phase"] == phase]
        if not rows_p:
            continue
        last = rows_p[-1]
        extra = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.endswith(("acc", "map")))
        mean_s = sum(m["seconds"] for m in rows_p) / len(rows_p)
        lines.append(
            f"- {heading}: {len(rows_p)} epochs, final loss {last['loss']:.4f}"
            + (f", {extra}" if extra else "")
            + f", {mean_s:.2f} s/epoch"
        )
    lines.append("")
    lines += sections or []
    for img in images:
        lines += [f"![{img.stem}]({img.name})", ""]
    if notes:
        lines += ["## Notes", "", *(f"- {' '.join(str(n).split())}" for n in notes), ""]
    lines += [
        "Files: `config.yaml` (resolved config), `metrics.jsonl` (one line per epoch), `results.json`,",
        "`weights/*.safetensors`, `checkpoints/` (resume with `--resume`).",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
