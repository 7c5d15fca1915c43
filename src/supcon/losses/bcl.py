r"""Balanced Contrastive Learning (BCL; Zhu et al., CVPR 2022, "Balanced Contrastive Learning for
Long-Tailed Visual Recognition"), as in the authors' code (github.com/FlamieZhu/Balanced-Contrastive-
Learning: ``loss/contrastive.py`` BalSCL, ``loss/logitadjust.py``, ``models/resnext.py`` BCLModel).

Two branches on one encoder, trained jointly::

    L = alpha * L_LA + beta * L_BCL

**L_LA**, logit-adjusted cross-entropy (Menon et al., 2021) of a classifier on the encoder's
features: with the training set's class priors ``pi_c = n_c / sum_k n_k``::

    L_LA = mean_b  CE(logits_b + tau * log pi, y_b)

Predictions use the raw logits; the adjustment during training is what removes the head-class bias.

**L_BCL**, the balanced supervised contrastive loss. The ``V`` views of ``B`` samples are flattened
view-major into ``N = V * B`` anchors ``z_1 .. z_N`` (L2-normalised). *Class-complement*: the ``C``
class prototypes ``c_1 .. c_C`` (L2-normalised; in the model, the classifier's weight rows through an
MLP, see :class:`supcon.models.bcl.BCLModel`) join as extra keys, prototype ``k`` with label ``k``, so
every class is
present in every batch. The keys are ``K = [z_1 .. z_N, c_1 .. c_C]`` with labels ``y_j``, and
``s_ij = z_i . K_j / T``. The batch count of class ``c`` counts the prototype too::

    n_c = V * |{b : y_b = c}| + 1

*Class-averaging*: in the denominator each key is divided by the size of its class among the
anchor's candidate keys (the anchor itself left out)::

    w_ij = n_{y_j} - [y_j = y_i]                  (j != i)
    P(i) = {j != i : y_j = y_i}                   |P(i)| = n_{y_i} - 1 >= V
    l_i  = -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip) / sum_{j != i} exp(s_ij) / w_ij )
         = log sum_{j != i} exp(s_ij - log w_ij) - mean_{p in P(i)} s_ip
    L_BCL = mean_i l_i                            (over all N anchors)

so the denominator is the sum over classes of the class's *mean* ``exp(s_ij)``: a head class weighs
as much as a tail class. Only the ``N`` batch rows are anchors; prototypes are keys only. Every
anchor has a positive, its class's prototype, so there is no anchor to leave out (with ``V = 1`` and
a class seen once in the batch, the prototype is its only positive).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "BCLLoss",
    "LogitAdjustedCE",
    "adjusted_ce",
    "bcl_loss",
    "bcl_loss_unchecked",
    "log_prior",
    "logit_adjusted_ce",
]


def _check_inputs(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor) -> None:
    if features.dim() != 3:
        raise ValueError(f"features must have shape [B, V, D], got {tuple(features.shape)}")
    if prototypes.dim() != 2 or prototypes.shape[1] != features.shape[2]:
        raise ValueError(
            f"prototypes must have shape [C, D] with D = {features.shape[2]}, got {tuple(prototypes.shape)}"
        )
    if labels.shape != (features.shape[0],) or labels.is_floating_point():
        got = f"{labels.dtype} {tuple(labels.shape)}"
        raise ValueError(f"labels must be integer class ids [B = {features.shape[0]}], got {got}")
    # Checked where reading them costs no wait (on the CPU); on a device a bad id fails in index_add_.
    if (
        labels.device.type == "cpu"
        and len(labels)
        and bool(((labels < 0) | (labels >= len(prototypes))).any())
    ):
        raise ValueError(f"labels must lie in [0, {prototypes.shape[0]}) (one prototype per class)")


def bcl_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    temperature: float = 0.1,
    normalize: bool = True,
) -> torch.Tensor:
    """L_BCL (module docstring) of ``features [B, V, D]``, ``labels [B]`` (class ids in ``[0, C)``)
    and ``prototypes [C, D]``; a scalar, differentiable in features and prototypes.

    ``normalize=False``: the rows are taken as they are (already unit vectors). An empty batch gives a
    zero attached to the graph (a rank's empty share of a last batch still runs backward).
    """
    _check_inputs(features, labels, prototypes)
    return bcl_loss_unchecked(features, labels, prototypes, temperature, normalize)


def bcl_loss_unchecked(
    features, labels, prototypes, temperature: float, normalize: bool = True
) -> torch.Tensor:
    """:func:`bcl_loss` without the checks of its inputs; nothing in it waits for the device (the
    training step's form: its labels come from the dataset, checked there)."""
    batch, views, _ = features.shape
    if batch == 0:
        return features.sum() * 0.0 + prototypes.sum() * 0.0
    if normalize:
        features, prototypes = F.normalize(features, dim=-1), F.normalize(prototypes, dim=-1)
    n, n_cls = batch * views, prototypes.shape[0]
    z = features.transpose(0, 1).reshape(n, -1)  # view-major, as torch.cat(torch.unbind(f, 1))
    keys = torch.cat([z, prototypes])
    y_anchor = labels.repeat(views)
    y_key = torch.cat([y_anchor, torch.arange(n_cls, device=labels.device)])
    # n_c: one prototype per class plus its anchors (index_add_, not bincount: no data-sized output).
    ones = torch.ones(n, dtype=z.dtype, device=z.device)
    counts = torch.ones(n_cls, dtype=z.dtype, device=z.device).index_add_(0, y_anchor, ones)

    s = z @ keys.T / temperature  # [N, N + C]
    same = y_anchor[:, None] == y_key[None, :]
    self_col = torch.zeros_like(same)
    self_col[:, :n] = torch.eye(n, dtype=torch.bool, device=z.device)
    positive = same & ~self_col
    weight = counts[y_key][None, :] - positive.to(z.dtype)  # w_ij = n_{y_j} - [y_j = y_i], j != i
    lse = torch.logsumexp((s - weight.log()).masked_fill(self_col, float("-inf")), dim=1)
    pos_mean = (s * positive).sum(1) / positive.sum(1)  # |P(i)| >= 1: the class prototype
    return (lse - pos_mean).mean()


def log_prior(class_counts: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """The logit adjustment ``tau * log(n_c / sum n)`` [C] of the training set's ``class_counts``
    [C], in float64. A class without training images gets ``-inf`` (the limit of its prior): it never wins a
    softmax it is not the target of."""
    if class_counts.dim() != 1:
        raise ValueError(f"class_counts must have shape [C], got {tuple(class_counts.shape)}")
    # Checked where reading them costs no wait (on the CPU).
    if class_counts.device.type == "cpu" and (
        bool((class_counts < 0).any()) or not bool((class_counts > 0).any())
    ):
        raise ValueError("class_counts must be non-negative with at least one positive count")
    counts = class_counts.double()
    # tau = 0 is plain cross-entropy, also for a class without images (0 * log 0 would be NaN).
    return tau * (counts / counts.sum()).log() if tau else torch.zeros_like(counts)


def logit_adjusted_ce(
    logits: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """L_LA: cross-entropy of ``logits [N, C] + tau * log(n_c / sum n)`` (:func:`log_prior`) against
    ``labels [N]``; ``class_counts [C]``: the training set's images per class. An empty batch gives
    a zero attached to the graph."""
    if logits.dim() != 2 or class_counts.shape != (logits.shape[1],):
        raise ValueError(
            f"logits [N, C] and class_counts [C] must agree, got {tuple(logits.shape)} and "
            f"{tuple(class_counts.shape)}"
        )
    return adjusted_ce(logits, labels, log_prior(class_counts, tau))


def adjusted_ce(logits: torch.Tensor, labels: torch.Tensor, adjust: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits [N, C] + adjust [C]`` against ``labels [N]``, the adjustment computed
    once (:func:`log_prior`) and not checked: the training step's form of :func:`logit_adjusted_ce`."""
    if len(labels) == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits + adjust.to(device=logits.device, dtype=logits.dtype), labels)


class BCLLoss(nn.Module):
    """:func:`bcl_loss` with its temperature fixed: ``loss(features, labels, prototypes)``."""

    def __init__(self, temperature: float = 0.1, normalize: bool = True):
        super().__init__()
        self.temperature, self.normalize = temperature, normalize

    def forward(self, features, labels, prototypes) -> torch.Tensor:
        return bcl_loss(features, labels, prototypes, self.temperature, self.normalize)


class LogitAdjustedCE(nn.Module):
    """:func:`logit_adjusted_ce` with the class counts kept as a buffer: ``loss(logits, labels)``."""

    def __init__(self, class_counts, tau: float = 1.0):
        super().__init__()
        self.register_buffer("class_counts", torch.as_tensor(class_counts, dtype=torch.float32))
        self.tau = tau

    def forward(self, logits, labels) -> torch.Tensor:
        return logit_adjusted_ce(logits, labels, self.class_counts, self.tau)
