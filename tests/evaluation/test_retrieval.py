"""Retrieval: neighbours (exact, chunked, faiss) and metrics against pytorch-metric-learning and a
slow brute-force reference."""

import math
import sys

import pytest
import torch
from torch.nn import functional as F

from supcon.core.errors import UsageError
from supcon.evaluation.evaluate import knn_accuracy
from supcon.evaluation.retrieval import knn_search, retrieval_metrics, weighted_knn_predict

pytestmark = pytest.mark.usefixtures("one_thread")

PML_KEYS = {
    "precision_at_1": "precision@1",
    "r_precision": "r_precision",
    "mean_average_precision_at_r": "map@r",
}


def clustered(n: int, classes: int = 6, dim: int = 12, noise: float = 1.3, seed: int = 0):
    """Gaussian clusters that overlap enough that no metric is trivially 0 or 1 (and no ties)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 1.2
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + noise * torch.randn(n, dim, generator=g), y


def pml(query, query_y, gallery=None, gallery_y=None) -> dict:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=tuple(PML_KEYS), device=torch.device("cpu"))
    # pml's default search is L2 in faiss: on unit vectors, the same order as cosine similarity.
    gallery = None if gallery is None else F.normalize(gallery, dim=1)
    got = calc.get_accuracy(F.normalize(query, dim=1), query_y, gallery, gallery_y)
    return {PML_KEYS[k]: v for k, v in got.items()}


def brute_force(query, query_y, gallery, gallery_y, ks, knn_ks, t, leave_one_out):
    """recall@k and weighted kNN from the full similarity matrix, one query at a time."""
    q, g = F.normalize(query, dim=1), F.normalize(gallery, dim=1)
    out = {f"recall@{k}": 0.0 for k in ks} | {f"knn@{k}": 0.0 for k in knn_ks}
    for i in range(len(q)):
        sims = (g @ q[i]).tolist()
        order = sorted((j for j in range(len(g)) if not (leave_one_out and j == i)), key=lambda j: -sims[j])
        for k in ks:
            out[f"recall@{k}"] += any(int(gallery_y[j]) == int(query_y[i]) for j in order[:k])
        for k in knn_ks:
            votes: dict[int, float] = {}
            for j in order[:k]:
                votes[int(gallery_y[j])] = votes.get(int(gallery_y[j]), 0.0) + math.exp(sims[j] / t)
            out[f"knn@{k}"] += max(votes, key=votes.get) == int(query_y[i])
    return {k: v / len(q) for k, v in out.items()}


def test_leave_one_out_matches_pytorch_metric_learning():
    x, y = clustered(240)
    got = retrieval_metrics(x, y)
    ref = pml(x, y)
    assert 0.2 < ref["map@r"] < 0.95  # not a trivial case
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_query_against_gallery_matches_pytorch_metric_learning():
    x, y = clustered(410, seed=1)
    q, qy, g, gy = x[:150], y[:150], x[150:], y[150:]
    got = retrieval_metrics(q, qy, g, gy)
    ref = pml(q, qy, g, gy)
    assert 0.2 < ref["r_precision"] < 0.95
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_singleton_and_absent_classes_are_left_out_as_pml_does():
    x, y = clustered(120, classes=4)
    y = y.clone()
    y[7] = 9  # a class with a single member: no other relevant item when it is the query
    got, ref = retrieval_metrics(x, y), pml(x, y)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    # precision@1 is the mean over the other 119 queries (the lone one is left out, not counted 0)
    _, idx = knn_search(x, None, 1)
    hits = (y[idx[:, 0]] == y).double()
    keep = torch.arange(len(y)) != 7
    assert got["precision@1"] == pytest.approx(float(hits[keep].mean()), rel=1e-12)
    assert got["recall@1"] == pytest.approx(float(hits.mean()), rel=1e-12)  # recall counts every query
    # Separate gallery without the query's class: those queries are left out too.
    q, qy = clustered(60, classes=4, seed=3)
    g, gy = clustered(80, classes=4, seed=4)
    gy = gy.clone()
    gy[gy == 2] = 1
    got, ref = retrieval_metrics(q, qy, g, gy), pml(q, qy, g, gy)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key


def test_no_query_with_a_relevant_item_gives_nan_but_recall_and_knn_count_every_query():
    q, g = torch.randn(5, 4), torch.randn(7, 4)
    got = retrieval_metrics(q, torch.zeros(5, dtype=torch.long), g, torch.ones(7, dtype=torch.long))
    assert all(math.isnan(got[k]) for k in ("precision@1", "r_precision", "map@r"))
    assert got["recall@10"] == 0.0 and got["knn@20"] == 0.0


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_recall_and_knn_match_a_brute_force_reference(leave_one_out):
    q, qy = clustered(70, seed=5)
    g, gy = (q, qy) if leave_one_out else clustered(90, seed=6)
    ks, knn_ks = (1, 3, 10), (5, 20, 200)  # 200 > gallery size: every item votes
    got = retrieval_metrics(q, qy, None if leave_one_out else g, None if leave_one_out else gy,
                            ks=ks, knn_ks=knn_ks, knn_t=0.07)  # fmt: skip
    ref = brute_force(q, qy, g, gy, ks, knn_ks, 0.07, leave_one_out)
    assert 0 < ref["recall@1"] < ref["recall@10"] <= 1
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_knn_search_is_exact_and_leaves_each_query_out():
    x, _ = clustered(50, seed=7)
    sims, idx = knn_search(x, None, 6)
    full = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    full.fill_diagonal_(float("-inf"))
    want_s, want_i = full.topk(6, dim=1)
    assert torch.equal(idx, want_i)
    assert torch.allclose(sims, want_s, atol=1e-6)
    assert not (idx == torch.arange(50)[:, None]).any()
    # k beyond the gallery: every other item once
    _, idx = knn_search(x[:4], None, 10)
    assert idx.shape == (4, 3)


def test_tiny_chunks_give_the_same_neighbours_and_metrics():
    q, qy = clustered(45, seed=8)
    g, gy = clustered(64, seed=9)
    for gallery, gallery_y in ((None, None), (g, gy)):
        a = knn_search(q, gallery, 12, chunk_size=2048)
        b = knn_search(q, gallery, 12, chunk_size=3)
        assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], atol=1e-6)
        big = retrieval_metrics(q, qy, gallery, gallery_y)
        small = retrieval_metrics(q, qy, gallery, gallery_y, chunk_size=4)
        assert big == pytest.approx(small, rel=1e-12)


def test_faiss_finds_the_same_neighbours():
    pytest.importorskip("faiss")
    q, qy = clustered(80, seed=10)
    g, gy = clustered(120, seed=11)
    for gallery in (None, g):
        exact = knn_search(q, gallery, 15)
        fast = knn_search(q, gallery, 15, backend="faiss", chunk_size=16)
        assert torch.equal(exact[1], fast[1])
        assert torch.allclose(exact[0], fast[0], atol=1e-5)
    assert retrieval_metrics(q, qy, g, gy, backend="faiss") == pytest.approx(retrieval_metrics(q, qy, g, gy))


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'supcon\[faiss\]'"):
        knn_search(torch.randn(3, 2), None, 1, backend="faiss")


def test_bad_input_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown retrieval backend"):
        knn_search(torch.randn(3, 2), None, 1, backend="annoy")
    with pytest.raises(UsageError, match="differ in length"):
        retrieval_metrics(torch.randn(3, 2), torch.zeros(2, dtype=torch.long))


def test_weighted_vote_and_knn_accuracy():
    # Two neighbours of class 1 at similarity 0.1 lose to one of class 0 at 0.2 when T is small.
    sims = torch.tensor([[0.2, 0.1, 0.1]])
    labels = torch.tensor([[0, 1, 1]])
    assert weighted_knn_predict(sims, labels, 2, 0.07).item() == 0
    assert weighted_knn_predict(sims, labels, 2, 10.0).item() == 1
    q, qy = clustered(40, seed=12)
    g, gy = clustered(70, seed=13)
    ref = brute_force(q, qy, g, gy, (), (20,), 0.1, False)["knn@20"]
    assert knn_accuracy(g, gy, q, qy, 20, 0.1) == pytest.approx(ref)
