"""Run reports: the terminal tables and the Markdown report (its plots: :mod:`supcon.evaluation.plots`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from supcon.core.files import atomic_write
from supcon.core.runlog import read_metrics

PHASE_TITLES = {
    "ce": "Experiment 1: cross-entropy (encoder + classifier)",
    "pretrain": "Experiment 2a: contrastive pre-training",
    "linear": "Experiment 2b: classifier on the frozen encoder",
}


# Multi-label rows (supcon.evaluation.multilabel): their metric keys and column titles, in place of test_acc.
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


def confusion_matrix(pred: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C]: row = true class, column = predicted class, each row normalised to sum 1 (the share of
    that class's images given each prediction); a class without images has a row of zeros."""
    counts = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(counts, (np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1.0)
    return counts / np.maximum(counts.sum(1, keepdims=True), 1.0)


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
    text = "\n".join(lines)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path
