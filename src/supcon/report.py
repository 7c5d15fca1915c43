"""Run reports: the terminal table, a Markdown report, and PNG plots (curves, t-SNE maps)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PHASE_TITLES = {
    "ce": "Experiment 1: cross-entropy (encoder + classifier)",
    "pretrain": "Experiment 2a: contrastive pre-training",
    "linear": "Experiment 2b: classifier on the frozen encoder",
}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(rows: list[dict]) -> str:
    """Rows of {experiment, test_acc, train_seconds, ...} as an aligned text/Markdown table."""
    head = ["experiment", "test accuracy", "train time", "s/epoch"]
    body = [
        [
            r["experiment"],
            f"{100 * r['test_acc']:.2f}%",
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


def plot_curves(metrics: list[dict], path: Path) -> Path | None:
    """Per epoch, one line per phase: training loss, training accuracy, and (when logged) held-out
    accuracy: the classifiers' validation accuracy and the kNN monitor of pre-training."""
    phases = [p for p in PHASE_TITLES if any(m["phase"] == p for m in metrics)]
    if not phases:
        return None
    held_out = any(k in m for m in metrics for k in HELD_OUT)
    fig, axes = plt.subplots(1, 3 if held_out else 2, figsize=(17 if held_out else 12, 4.5))
    ax_loss, ax_acc = axes[0], axes[1]
    for i, phase in enumerate(phases):
        color = f"C{i}"  # one colour per phase in every panel
        rows = [m for m in metrics if m["phase"] == phase]
        ax_loss.plot(
            [m["epoch"] for m in rows], [m["loss"] for m in rows], color=color, label=f"{phase} loss"
        )
        series = [(ax_acc, "train_acc", "train accuracy")]
        if held_out:
            series += [(axes[2], key, name) for key, name in HELD_OUT.items()]
        for ax, key, name in series:
            vals = [(m["epoch"], m[key]) for m in rows if key in m]
            if vals:
                ax.plot(
                    *zip(*vals, strict=True),
                    color=color,
                    linestyle=":" if "knn" in key else "-",
                    marker="." if len(vals) < 30 else None,
                    label=f"{phase}: {name}",
                )
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    ax_acc.set(title="training accuracy", xlabel="epoch", ylabel="accuracy")
    if held_out:
        axes[2].set(
            title="held-out accuracy (validation split / kNN monitor)", xlabel="epoch", ylabel="accuracy"
        )
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tsne(
    maps: dict[str, np.ndarray], labels: np.ndarray, classes: list[str], path: Path, seed: int = 0
) -> Path:
    """Side-by-side 2-D t-SNE maps of test features, one panel per encoder."""
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(maps), figsize=(6.2 * len(maps), 6), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for ax, (title, feats) in zip(axes[0], maps.items(), strict=True):
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        perplexity = float(min(30, max(5, (len(feats) - 1) // 3)))
        xy = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(feats)
        for c in range(len(classes)):
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(c % cmap.N), label=classes[c])
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:
        axes[0][-1].legend(markerscale=4, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dir: Path, title: str, summary: list[str], rows: list[dict], images: list[Path]) -> Path:
    lines = [f"# {title}", ""]
    lines += summary + ["", "## Results", "", table(rows), ""]
    metrics = read_metrics(run_dir)
    for phase, heading in PHASE_TITLES.items():
        rows_p = [m for m in metrics if m["phase"] == phase]
        if not rows_p:
            continue
        last = rows_p[-1]
        extra = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.endswith("acc"))
        mean_s = sum(m["seconds"] for m in rows_p) / len(rows_p)
        lines.append(
            f"- {heading}: {len(rows_p)} epochs, final loss {last['loss']:.4f}"
            + (f", {extra}" if extra else "")
            + f", {mean_s:.2f} s/epoch"
        )
    lines.append("")
    for img in images:
        lines += [f"![{img.stem}]({img.name})", ""]
    lines += [
        "Files: `config.yaml` (resolved config), `metrics.jsonl` (one line per epoch), `results.json`,",
        "`weights/*.safetensors`, `checkpoints/` (resume with `--resume`).",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
