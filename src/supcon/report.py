"""Run reports: the terminal table, a Markdown report, and PNG plots (curves, t-SNE maps)."""

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
) -> Path:
    """``report.md`` in ``run_dir``. ``images`` may hold, in place of a plot, the reason it was not
    drawn (what ``plot_tsne`` and ``plot_curves`` return then); these and ``notes`` are listed as notes.
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
