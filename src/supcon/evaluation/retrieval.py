"""Retrieval on embeddings: exact (or faiss) cosine k-nearest neighbours and the metrics of deep
metric learning.

Definitions follow pytorch-metric-learning's ``AccuracyCalculator`` (default settings: a mean over
queries, not over classes): a query whose class has no other member in the gallery has no relevant
item, so it is left out of precision@1, R-precision and MAP@R (all NaN when every query is such a
query). R of a query is the number of gallery items of its class (itself excluded in the
leave-one-out case). recall@k (1 when any of the k nearest shares the query's label) and the
weighted kNN accuracy (InstDisc: votes exp(sim / T)) count every query.

Neighbours are found in blocks of queries against the whole gallery, one top-k per query (or, for a
gallery too large for that, against gallery chunks with a running top-k): the similarities held at
once are bounded (:data:`BLOCK_SIMILARITIES`), never queries x gallery.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

from supcon.core.errors import UsageError

Backend = Literal["exact", "faiss"]


# Similarities held at once by the exact search: a block of queries against the whole gallery (or
# against gallery chunks, for a gallery too large for one block of at least 64 queries).
BLOCK_SIMILARITIES = 1 << 26  # 256 MiB of float32


def _exact_search(gallery: torch.Tensor, chunk_size: int):
    """Top-k over the gallery for a block of queries: one ``topk`` over the whole row when a block
    of the gallery's width fits :data:`BLOCK_SIMILARITIES`, else a running top-k over gallery
    chunks. One selection per query instead of one per chunk matters at large k (R-precision and
    MAP@R ask for up to R = thousands of neighbours): 10,000 x 50,000 with k = 5,000 took 112 s
    with a running top-k over 2,048-item chunks."""
    whole = len(gallery) * 64 <= BLOCK_SIMILARITIES

    def search(q: torch.Tensor, q0: int, k: int, exclude_self: bool):
        width = len(gallery) if whole else chunk_size
        best_s = q.new_full((len(q), 0), float("-inf"))
        best_i = torch.zeros(len(q), 0, dtype=torch.long, device=q.device)
        for g0 in range(0, len(gallery), width):
            s = q @ gallery[g0 : g0 + width].T
            if exclude_self:  # query q0 + i is gallery item q0 + i
                rows = torch.arange(len(q), device=q.device)
                inside = (q0 + rows >= g0) & (q0 + rows < g0 + s.shape[1])
                s[rows[inside], (q0 + rows - g0)[inside]] = float("-inf")
            if whole:
                return s.topk(min(k, s.shape[1]), dim=1)
            cols = torch.arange(g0, g0 + s.shape[1], device=q.device)
            s = torch.cat([best_s, s], 1)
            i = torch.cat([best_i, cols.expand(len(q), -1)], 1)
            best_s, top = s.topk(min(k, s.shape[1]), dim=1)
            best_i = i.gather(1, top)
        return best_s, best_i

    return search


def query_block(gallery_size: int, chunk_size: int) -> int:
    """Queries per block: as many as :data:`BLOCK_SIMILARITIES` allows against the whole gallery
    (at least 64, at most 4,096), else ``chunk_size``."""
    if gallery_size * 64 > BLOCK_SIMILARITIES:
        return chunk_size
    return max(64, min(4096, BLOCK_SIMILARITIES // max(gallery_size, 1)))


def _faiss_search(gallery: torch.Tensor):
    """faiss' exact inner-product index (IndexFlatIP) over the normalised gallery."""
    try:
        import faiss
    except ImportError:
        raise UsageError("the faiss retrieval backend needs faiss: pip install 'supcon[faiss]'") from None
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery.detach().cpu().contiguous().numpy())

    def search(q: torch.Tensor, q0: int, k: int, exclude_self: bool):
        s, i = index.search(q.detach().cpu().contiguous().numpy(), min(k + int(exclude_self), len(gallery)))
        s, i = torch.from_numpy(s), torch.from_numpy(i).long()
        if exclude_self:
            # Drop the query itself; where it is not among the results (ties), drop the last one,
            # as pytorch-metric-learning does.
            is_self = i == torch.arange(q0, q0 + len(q))[:, None]
            is_self[~is_self.any(1), -1] = True
            s, i = s[~is_self].view(len(q), -1), i[~is_self].view(len(q), -1)
        return s.to(q.device), i.to(q.device)

    return search


def _blocks(query, gallery, k, exclude_self, chunk_size, backend):
    """(first query index, similarities [q, k'], indices [q, k']) per block of ``chunk_size`` queries."""
    if exclude_self and len(gallery) < len(query):
        raise UsageError("exclude_self needs the queries to be the gallery's first items")
    if chunk_size < 1:
        raise UsageError(f"chunk_size must be at least 1, got {chunk_size}")
    query = F.normalize(query.float(), dim=1)
    gallery = F.normalize(gallery.float().to(query.device), dim=1)
    k = max(0, min(k, len(gallery) - int(exclude_self)))
    if backend == "exact":
        search = _exact_search(gallery, chunk_size)
    elif backend == "faiss":
        search = _faiss_search(gallery)
    else:
        raise UsageError(f"unknown retrieval backend {backend!r}; choose exact or faiss")
    step = query_block(len(gallery), chunk_size) if backend == "exact" else chunk_size
    for q0 in range(0, len(query), step):
        yield (q0, *search(query[q0 : q0 + step], q0, k, exclude_self))


@torch.inference_mode()
def knn_search(
    query: torch.Tensor,
    gallery: torch.Tensor | None,
    k: int,
    *,
    exclude_self: bool = False,
    chunk_size: int = 2048,
    backend: Backend = "exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most cosine-similar gallery items of each query [Q, D]: similarities [Q, k']
    (descending) and gallery indices [Q, k'], with k' = min(k, gallery items available).

    ``gallery=None`` searches the queries themselves; ``exclude_self`` (implied then) leaves out
    gallery item i for query i, so the gallery's first Q items must be the queries.
    """
    if gallery is None:
        gallery, exclude_self = query, True
    parts = list(_blocks(query, gallery, k, exclude_self, chunk_size, backend))
    if not parts:
        return query.new_zeros(0, 0), torch.zeros(0, 0, dtype=torch.long, device=query.device)
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def weighted_knn_predict(
    sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """Predicted class [Q] from neighbours' similarities and labels [Q, k]: each neighbour votes for
    its class with weight exp(sim / T) (InstDisc, SupContrast's kNN monitor)."""
    votes = torch.zeros(len(sims), num_classes, device=sims.device)
    votes.scatter_add_(1, labels, (sims / temperature).exp())
    return votes.argmax(1)


def _relevant_counts(query_y: torch.Tensor, gallery_y: torch.Tensor, exclude_self: bool) -> torch.Tensor:
    """R per query: gallery items of its class (itself not counted in the leave-one-out case)."""
    n = max(int(query_y.max()), int(gallery_y.max())) + 1
    counts = torch.bincount(gallery_y, minlength=n)
    return counts[query_y] - int(exclude_self)


def _chunk_metrics(
    sims, nn_y, y, r, ks, knn_ks, knn_t, num_classes
) -> dict[str, torch.Tensor]:  # sums over the chunk's queries
    hit = nn_y == y[:, None]  # [q, K]
    rank = torch.arange(1, hit.shape[1] + 1, device=hit.device)
    ok = r > 0  # queries with at least one relevant item (pml's "not lone")
    within_r = rank[None, :] <= r[:, None]
    rel = hit & within_r
    rr = r.clamp_min(1).double()
    precision_at_i = hit.cumsum(1).double() / rank
    out = {
        "precision@1": (hit[:, 0] & ok).sum().double(),
        "r_precision": (rel.sum(1).double() / rr)[ok].sum(),
        "map@r": ((precision_at_i * rel).sum(1) / rr)[ok].sum(),
    }
    for k in ks:
        out[f"recall@{k}"] = hit[:, :k].any(1).sum().double()
    for k in knn_ks:
        pred = weighted_knn_predict(sims[:, :k], nn_y[:, :k], num_classes, knn_t)
        out[f"knn@{k}"] = (pred == y).sum().double()
    return out


@torch.inference_mode()
def retrieval_metrics(
    query: torch.Tensor,
    query_y: torch.Tensor,
    gallery: torch.Tensor | None = None,
    gallery_y: torch.Tensor | None = None,
    *,
    ks: tuple[int, ...] = (1, 5, 10),
    knn_ks: tuple[int, ...] = (20, 200),
    knn_t: float = 0.07,
    backend: Backend = "exact",
    chunk_size: int = 2048,
) -> dict[str, float]:
    """precision@1, R-precision, MAP@R, recall@k for ``ks`` and weighted kNN accuracy for ``knn_ks``
    of ``query`` [Q, D] against ``gallery`` [G, D] (cosine similarity; labels int64 [Q], [G]).

    Without a gallery, each query is searched among the other queries (leave-one-out, as
    ``AccuracyCalculator`` with ``reference = query``). Keys: ``precision@1``, ``r_precision``,
    ``map@r``, ``recall@{k}``, ``knn@{k}``.
    """
    exclude_self = gallery is None
    if exclude_self:
        gallery, gallery_y = query, query_y
    if gallery_y is None:
        raise UsageError("retrieval_metrics: a gallery needs its labels (gallery_y)")
    if len(query) != len(query_y) or len(gallery) != len(gallery_y):
        raise UsageError("retrieval_metrics: embeddings and labels differ in length")
    keys = [
        "precision@1",
        "r_precision",
        "map@r",
        *(f"recall@{k}" for k in ks),
        *(f"knn@{k}" for k in knn_ks),
    ]
    if len(query) == 0 or len(gallery) - int(exclude_self) < 1:
        return dict.fromkeys(keys, float("nan"))
    query_y, gallery_y = query_y.long().cpu(), gallery_y.long().cpu()
    r = _relevant_counts(query_y, gallery_y, exclude_self)
    k = max(1, int(r.max()), *ks, *knn_ks)
    num_classes = int(max(query_y.max(), gallery_y.max())) + 1
    sums = dict.fromkeys(keys, torch.zeros((), dtype=torch.float64))
    # Metrics per block of queries: the [Q, R] neighbour lists are never held all at once.
    for q0, sims, idx in _blocks(query, gallery, k, exclude_self, chunk_size, backend):
        part = slice(q0, q0 + len(idx))
        nn_y = gallery_y[idx.cpu()]
        m = _chunk_metrics(sims.cpu(), nn_y, query_y[part], r[part], ks, knn_ks, knn_t, num_classes)
        sums = {key: sums[key] + m[key] for key in keys}
    n_ok = int((r > 0).sum())
    out = {}
    for key in keys:
        n = len(query) if key.startswith(("recall", "knn")) else n_ok
        out[key] = float(sums[key] / n) if n else float("nan")
    return out


__all__ = ["knn_search", "retrieval_metrics", "weighted_knn_predict"]
