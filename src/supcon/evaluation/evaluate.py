"""Evaluation: features, predictions, accuracy and the weighted kNN classifier, in eval mode.
Multi-label data is scored by :mod:`supcon.evaluation.multilabel` (mAP, F1) from the same logits and kNN
votes."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from supcon.core.runtime import Runtime
from supcon.data.dataset import Normalize
from supcon.data.labels import refuse
from supcon.evaluation.multilabel import knn_scores, mean_ap
from supcon.evaluation.retrieval import knn_search, weighted_knn_predict


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside, and afterwards every submodule back in its own mode (a frozen encoder inside a
    training classifier stays in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


# Images per forward pass in evaluation: no gradients are kept, so larger than a training batch fits;
# the result does not depend on it.
EVAL_BATCH = 1024


@torch.inference_mode()
def _batched(
    model: nn.Module, x: torch.Tensor, rt: Runtime, norm: Normalize | None, batch_size: int
) -> list[torch.Tensor]:
    with eval_mode(model):
        out = []
        for i in range(0, len(x), batch_size):
            with rt.autocast():
                out.append(model(rt.images(x[i : i + batch_size], norm)).float())
    return out


def extract_features(
    encoder: nn.Module,
    x: torch.Tensor,
    rt: Runtime,
    norm: Normalize | None = None,
    batch_size: int = EVAL_BATCH,
) -> torch.Tensor:
    """Encoder features [N, D] (float32, on the device) of uint8 images [N, H, W, C], in eval mode."""
    out = _batched(encoder, x, rt, norm, batch_size)
    return torch.cat(out) if out else torch.zeros(0, 0, device=rt.device)


def predict_logits(
    model: nn.Module,
    x: torch.Tensor,
    rt: Runtime,
    norm: Normalize | None = None,
    batch_size: int = EVAL_BATCH,
) -> torch.Tensor:
    """A classifier's logits [N, C] (float32, CPU) of uint8 images (eval mode); [0, 0] for none."""
    out = _batched(model, x, rt, norm, batch_size)
    return torch.cat(out).cpu() if out else torch.zeros(0, 0)


def predict(
    model: nn.Module,
    x: torch.Tensor,
    rt: Runtime,
    norm: Normalize | None = None,
    batch_size: int = EVAL_BATCH,
) -> torch.Tensor:
    """Predicted class ids [N] of uint8 images (eval mode)."""
    out = _batched(model, x, rt, norm, batch_size)
    return torch.cat(out).argmax(1).cpu() if out else torch.zeros(0, dtype=torch.long)


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    if y.dim() == 2:
        refuse("accuracy (use supcon.evaluation.multilabel.metrics)")
    return float((pred.cpu() == y.cpu()).float().mean()) if len(y) else float("nan")


def knn_accuracy(
    bank: torch.Tensor,
    bank_y: torch.Tensor,
    query: torch.Tensor,
    query_y: torch.Tensor,
    k: int,
    temperature: float,
) -> float:
    """Weighted kNN on cosine similarity (as InstDisc/SupContrast monitors): votes exp(sim / T)."""
    if not len(query):
        return 0.0
    sims, idx = knn_search(query, bank, k)
    bank_y = bank_y.to(idx.device)
    pred = weighted_knn_predict(sims, bank_y[idx], int(bank_y.max()) + 1, temperature)
    return int((pred.cpu() == query_y.cpu()).sum()) / len(query)


def encoder_knn(
    encoder: nn.Module,
    bank: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    rt: Runtime,
    norm: Normalize | None,
    k: int,
    temperature: float,
) -> float | None:
    """kNN accuracy of ``encoder``'s features: ``query`` images classified by the ``bank`` images,
    each an (images, labels) pair. Multi-hot labels ``[N, C]``: the kNN mAP (vote shares as class
    scores; None when no query image carries any class)."""
    if bank[1].dim() == 2:
        scores = encoder_knn_scores(encoder, bank, query[0], rt, norm, k, temperature)
        return mean_ap(scores.numpy(), query[1].cpu().numpy())
    bank_f = extract_features(encoder, bank[0], rt, norm)
    query_f = extract_features(encoder, query[0], rt, norm)
    return knn_accuracy(bank_f, bank[1], query_f, query[1], k, temperature)


def encoder_knn_scores(
    encoder: nn.Module,
    bank: tuple[torch.Tensor, torch.Tensor],
    query_x: torch.Tensor,
    rt: Runtime,
    norm: Normalize | None,
    k: int,
    temperature: float,
) -> torch.Tensor:
    """Multi-label kNN scores ``[Q, C]`` in [0, 1] (CPU) of ``query_x``'s images: the weighted share
    of their ``k`` nearest ``bank`` images (images, multi-hot labels ``[N, C]``) carrying each class."""
    bank_f = extract_features(encoder, bank[0], rt, norm)
    query_f = extract_features(encoder, query_x, rt, norm)
    return knn_scores(bank_f, bank[1], query_f, k, temperature)
