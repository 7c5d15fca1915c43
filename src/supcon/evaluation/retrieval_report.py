"""A run's encoders as retrieval models, for its results and report: features extracted once,
the retrieval blocks (closed and open set), the retrieval panel and the t-SNE map."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from supcon.data.dataset import ImageDataset
from supcon.evaluation.evaluate import extract_features
from supcon.evaluation.plots import plot_retrieval, plot_tsne
from supcon.evaluation.retrieval import knn_search, retrieval_metrics

Features = dict[str, tuple[torch.Tensor, torch.Tensor]]  # encoder name -> (training, test) features


def encoder_features(encoders: dict, data: ImageDataset, rt) -> Features:
    """Each encoder's features [N, D] of the training and the test images (CPU), extracted once for
    retrieval, its panel and the t-SNE map."""
    return {
        name: tuple(extract_features(enc, x, rt, data.norm).cpu() for x in (data.train_x, data.test_x))
        for name, enc in encoders.items()
    }


KNN_TEMPERATURE = 0.07  # the retrieval rows' kNN (InstDisc's); the kNN monitor has its own setting


def retrieval_block(feats: Features, data: ImageDataset) -> dict:
    """Retrieval of each encoder: the test images as queries, the training images as the gallery."""
    return {
        "queries": f"the {len(data.test_y)} test images",
        "gallery": f"the {len(data.train_y)} training images",
        "features": "L2-normalised encoder features, cosine similarity",
        "knn_temperature": KNN_TEMPERATURE,
        "encoders": {
            name: retrieval_metrics(test_f, data.test_y, train_f, data.train_y, knn_t=KNN_TEMPERATURE)
            for name, (train_f, test_f) in feats.items()
        },
    }


def open_set_block(rt, data: ImageDataset, encoders: dict) -> dict | None:
    """Retrieval among the classes no phase trained on (``data.exclude_classes``)."""
    held = data.held_out
    if held is None or not encoders:
        return None
    block = retrieval_block(encoder_features(encoders, held, rt), held)
    names = sorted({held.classes[int(c)] for c in torch.unique(torch.cat([held.train_y, held.test_y]))})
    return block | {"classes": names}


def _sample(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n].sort().values


# Test images in the t-SNE map: enough to show the classes' clusters, few enough for seconds.
TSNE_POINTS = 2000


def tsne_map(out_dir: Path, seed: int, data: ImageDataset, feats: Features) -> tuple[Path | str, float]:
    sel = _sample(data.test_y, min(len(data.test_y), TSNE_POINTS), seed)
    maps = {name: test_f[sel].numpy() for name, (_, test_f) in feats.items()}
    t0 = time.perf_counter()
    path = plot_tsne(maps, data.test_y[sel].numpy(), data.classes, out_dir / "tsne.png", seed)
    return path, time.perf_counter() - t0


def retrieval_panel(
    out_dir: Path, seed: int, data: ImageDataset, feats: Features, queries: int = 6
) -> Path | str:
    """A few test queries (of different classes where there are enough) and their 8 nearest training
    images, one panel per encoder."""
    y_all = data.test_y.tolist()
    perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed)).tolist()
    by_class: dict[int, int] = {}
    for i in perm:
        by_class.setdefault(y_all[i], i)
    picked = list(by_class.values())[:queries]
    picked += [i for i in perm if i not in set(picked)][: queries - len(picked)]
    sel = torch.tensor(sorted(picked, key=lambda i: (y_all[i], i)), dtype=torch.long)
    panels = {
        name: knn_search(test_f[sel], train_f, 8)[1].numpy() if len(sel) else np.zeros((0, 0), dtype=np.int64)
        for name, (train_f, test_f) in feats.items()
    }
    x, y = data.test_x[sel].numpy(), data.test_y[sel].numpy()
    # Only the gallery images shown are read (a stored gallery may not fit in memory).
    used = np.unique(np.concatenate([p.reshape(-1) for p in panels.values()] + [np.zeros(0, np.int64)]))
    panels = {name: np.searchsorted(used, p) for name, p in panels.items()}
    gallery_x = data.train_x[torch.from_numpy(used)].numpy()
    gallery_y = data.train_y[torch.from_numpy(used)].numpy()
    return plot_retrieval(panels, x, y, gallery_x, gallery_y, data.classes, out_dir / "retrieval.png")
