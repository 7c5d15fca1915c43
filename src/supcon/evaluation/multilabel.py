"""Multi-label data: the one-vs-rest loss and the metrics (the label helpers are in
:mod:`supcon.data.labels`).

A multi-label dataset's labels are multi-hot ``[N, C]`` (float32 0/1): image ``n`` carries class ``c``
when ``y[n, c] == 1``, any number of classes (none included). A classifier gives ``C`` logits per
image, one independent yes/no each (one-vs-rest): trained with binary cross-entropy on the logits,
read at a threshold of 0.5 on their sigmoid (a logit above 0).

Metrics, all pure functions of scores ``[N, C]`` and labels ``[N, C]``:

- average precision of a class: scikit-learn's ``average_precision_score``,
  ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds, highest first (no
  interpolation; tied scores form one threshold). A class with no positive image has no AP: it is
  skipped in the mean (mAP) and counted.
- micro-F1: ``2 TP / (2 TP + FP + FN)`` summed over every class.
- macro-F1: the mean of each class's F1 over the classes mAP averages (those with a positive image,
  whose F1 is always defined); micro-F1 counts every class.
- exact match: the share of images whose whole predicted label set is right.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

THRESHOLD = 0.5  # on sigmoid(logit): a logit above 0 predicts the class
QUERY_ROWS = 1024  # kNN queries scored at a time: a [QUERY_ROWS, N] similarity block


def bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One-vs-rest binary cross-entropy of logits ``[B, C]`` against multi-hot ``y [B, C]``, mean over
    all ``B * C`` entries."""
    return F.binary_cross_entropy_with_logits(logits.float(), y.float())


def predicted(scores: torch.Tensor | np.ndarray, probabilities: bool = False) -> np.ndarray:
    """The predicted label sets (bool ``[N, C]``) of logits ``[N, C]`` (or of probabilities): sigmoid
    (or the probability itself) above :data:`THRESHOLD`."""
    s = torch.as_tensor(scores).float()
    return ((s if probabilities else torch.sigmoid(s)) > THRESHOLD).cpu().numpy()


def exact_matches(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How many of the ``B`` images (0-d tensor, on the logits' device) have every one of their ``C``
    predictions right: the multi-label training accuracy."""
    return ((logits > 0) == (y > 0.5)).all(1).sum()


def average_precision(scores: np.ndarray, y: np.ndarray) -> float:
    """Average precision of one class: scores ``[N]`` (higher: more likely), labels ``[N]`` 0/1.
    NaN when no label is positive."""
    scores, y = np.asarray(scores, np.float64), np.asarray(y) > 0.5
    if not y.any():
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, hits = scores[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the end of each run of tied scores
    tp = np.cumsum(hits)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def per_class_ap(scores: np.ndarray, y: np.ndarray) -> list[float]:
    """Average precision of each class ``[C]`` (NaN for a class with no positive)."""
    scores, y = np.asarray(scores), np.asarray(y)
    return [average_precision(scores[:, c], y[:, c]) for c in range(y.shape[1])]


def mean_ap(scores: np.ndarray, y: np.ndarray) -> float | None:
    """mAP: the mean AP ``[C]`` over the classes with a positive; None when there is none."""
    kept = [a for a in per_class_ap(scores, y) if not math.isnan(a)]
    return float(np.mean(kept)) if kept else None


def f1_scores(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(micro-F1, macro-F1) of predicted label sets ``pred [N, C]`` (bool) against ``y [N, C]``.

    Macro-F1 averages the classes with a positive label (as mAP does); NaN when there is none.
    """
    pred, y = np.asarray(pred, bool), np.asarray(y) > 0.5
    tp = (pred & y).sum(0)
    fp = (pred & ~y).sum(0)
    fn = (~pred & y).sum(0)
    denom = 2 * tp.sum() + fp.sum() + fn.sum()
    micro = float(2 * tp.sum() / denom) if denom else 0.0
    has = y.any(0)
    per_class = 2 * tp[has] / (2 * tp[has] + fp[has] + fn[has])
    macro = float(per_class.mean()) if has.any() else float("nan")
    return micro, macro


def metrics(
    scores: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, classes: list[str], probabilities=False
) -> dict:
    """A result row's multi-label metrics of logits ``[N, C]`` (``probabilities``: of scores in [0, 1],
    such as kNN vote shares) against multi-hot ``y [N, C]``.

    ``map`` (NaN-free: None when no class has a positive), ``micro_f1``, ``macro_f1``, ``exact_match``,
    ``ap_per_class`` ({class: AP or None}) and ``classes_skipped`` (classes with no positive image).
    """
    s = torch.as_tensor(scores).float().cpu().numpy()
    t = torch.as_tensor(y).cpu().numpy()
    aps = per_class_ap(s, t)
    kept = [a for a in aps if not math.isnan(a)]
    pred = predicted(s, probabilities)
    micro, macro = f1_scores(pred, t)
    return {
        "map": float(np.mean(kept)) if kept else None,
        "micro_f1": micro,
        "macro_f1": None if math.isnan(macro) else macro,
        "exact_match": float((pred == (t > 0.5)).all(1).mean()) if len(t) else None,
        "ap_per_class": {c: (None if math.isnan(a) else a) for c, a in zip(classes, aps, strict=True)},
        "classes_skipped": len(aps) - len(kept),
    }


def knn_scores(
    bank: torch.Tensor, bank_y: torch.Tensor, query: torch.Tensor, k: int, temperature: float
) -> torch.Tensor:
    """Weighted kNN label scores ``[Q, C]`` (CPU): each query's ``k`` nearest bank features (cosine)
    vote their multi-hot labels ``bank_y [N, C]`` with weight ``exp(sim / T)``, normalised by the
    total weight (so a score is the weighted share of neighbours carrying the class)."""
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    bank_y = bank_y.float().to(bank.device)
    k = min(k, len(bank))
    out = []
    for i in range(0, len(query), QUERY_ROWS):
        w, j = (query[i : i + QUERY_ROWS] @ bank.T).topk(k, dim=1)
        w = (w / temperature).softmax(1)  # exp(sim / T) normalised; the max is subtracted first
        out.append(torch.einsum("qk,qkc->qc", w, bank_y[j]).cpu())
    return torch.cat(out) if out else torch.zeros(0, bank_y.shape[1])
