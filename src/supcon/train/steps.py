"""The training steps of the phases that have more than a forward and a loss: the contrastive step
(SupCon or SimCLR, with the memory queue and the joint classifier where configured) and BCL's, and
the classifier loss every phase shares.

A step is ``step(batch, global batch size, augmentation generator) -> StepOut`` for
:func:`supcon.train.loop.fit`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from supcon.core import dist
from supcon.core.config import LossConfig
from supcon.core.runtime import Runtime
from supcon.data.augment import split_views
from supcon.data.dataset import ImageDataset
from supcon.data.prefetch import TrainBatch
from supcon.evaluation import multilabel
from supcon.losses.bcl import adjusted_ce, bcl_loss_unchecked, log_prior
from supcon.losses.supcon import supcon_loss
from supcon.train.collapse import negative_similarity
from supcon.train.loop import StepOut, ddp_global, ddp_share


def bcl_step(
    net: nn.Module,
    loss_cfg: LossConfig,
    rt: Runtime,
    inputs: Callable[[TrainBatch, torch.Generator], torch.Tensor],
    train_y: torch.Tensor,
    views: int,
    class_counts: list[int],
) -> Callable:
    """The pre-training step of BCL for :func:`supcon.train.loop.fit`.

    ``net``: the (wrapped) :class:`BCLModel`; ``inputs(batch, generator)``: the batch's ``V * B``
    augmented images, view-major; ``class_counts``: the training set's images per class (the priors of
    the logit adjustment). Every view feeds both branches: the contrastive loss sees the ``V`` views of
    each sample, the cross-entropy each view (the training accuracy counts the first view).
    """
    adjust = log_prior(torch.tensor(class_counts), loss_cfg.logit_adjust_tau).float().to(rt.device)
    alpha, beta = loss_cfg.bcl_alpha, loss_cfg.bcl_beta

    def step(b, n_global, g):
        x = inputs(b, g)  # [V*B, C, H, W]
        y = train_y[b.idx].to(rt.device, non_blocking=True)
        with rt.autocast():
            z, logits, prototypes = net(x)
        z = split_views(z.float(), views)  # [B, V, D]
        logits = logits.float()
        # The labels come from the dataset (checked there): the unchecked forms, which never wait.
        con = bcl_loss_unchecked(z, y, prototypes.float(), loss_cfg.temperature)
        ce = adjusted_ce(logits, y.repeat(views), adjust)
        loss = alpha * ce + beta * con
        # Each rank's loss is over its own share of the batch (its own batch class counts).
        correct = (logits[: len(y)].argmax(1) == y).sum()
        return StepOut(loss, ddp_share(loss, len(y), n_global), correct)

    return step


def contrastive_step(net, extra, feed, train_y, lc, rt: Runtime, views: int, data: ImageDataset):
    """The SupCon (or SimCLR) step, with the memory queue's keys and the joint classifier's
    cross-entropy where configured."""
    use_labels = lc.method != "simclr"
    queue = extra.queue.queue if extra.queue is not None else None

    def step(b, n_global, g):
        x = feed(b, g)  # [V*B, C, H, W], view-major
        n = len(b.idx)
        with rt.autocast():
            z, logits = net(x) if extra.joint else (net(x), None)
        z = split_views(z.float(), views)  # [B, V, D]; B may be 0
        y = train_y[b.idx].to(rt.device, non_blocking=True)
        keys, key_labels = queue.keys() if queue is not None else (None, None)
        loss = supcon_loss(
            z,
            y if use_labels else None,
            temperature=lc.temperature,
            variant=lc.variant,
            chunk_size=lc.chunk_size,
            gather=dist.world_size() > 1,
            multilabel=lc.multilabel if data.multilabel and use_labels else None,
            keys=keys,
            key_labels=key_labels if use_labels else None,
        )
        if queue is not None:  # after the loss: a batch is not its own key; every rank, every step
            queue.enqueue(_keys_of(extra.ema, x, z, n, views, rt), y)
        neg = negative_similarity(z, y if use_labels else None, data.num_classes)
        if logits is None:
            return StepOut(loss, ddp_global(loss), negatives=neg)
        ce = classifier_loss(logits[:n], y)  # the first view's features
        total = loss.detach() + lc.ce_weight * ce.detach()
        backward = ddp_global(loss) + lc.ce_weight * ddp_share(ce, n, n_global)
        return StepOut(total, backward, (logits[:n].argmax(1) == y).sum(), neg)

    return step


def _keys_of(ema: nn.Module | None, x, z: torch.Tensor, n: int, views: int, rt: Runtime) -> torch.Tensor:
    """The keys a step enqueues, ``[B, V, D]`` L2-normalised: the momentum model's projections of the
    same views, or the batch's own (detached)."""
    if ema is None or n == 0:
        k = z.detach()
    else:
        with torch.no_grad(), rt.autocast():
            k = ema(x)
        k = split_views(k.float(), views)
    return F.normalize(k, dim=-1)


def classifier_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of class ids ``y [B]``; one-vs-rest binary cross-entropy of multi-hot
    ``y [B, C]`` (multi-label)."""
    # A rank whose share of a last, tiny batch is empty still runs backward (DDP needs every rank);
    # the mean over no samples would be NaN, a zero with a graph adds nothing.
    if not len(y):
        return logits.sum() * 0.0
    return multilabel.bce(logits, y) if y.dim() == 2 else F.cross_entropy(logits.float(), y)


def correct_predictions(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct predictions: the arg-max class, or (multi-label) the whole label set at 0.5."""
    return multilabel.exact_matches(logits, y) if y.dim() == 2 else (logits.argmax(1) == y).sum()
