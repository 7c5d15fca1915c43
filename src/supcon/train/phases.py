"""The three training phases, each a plain function: build the model, define its step, hand both to
:func:`supcon.train.loop.fit`.

- :func:`train_ce` (experiment 1): encoder and classifier trained together with cross-entropy.
- :func:`pretrain` (experiment 2a): contrastive pre-training of encoder + projection head.
- :func:`train_linear` (experiment 2b): a classifier on the pre-trained encoder, frozen (the linear
  probe) or fine-tuned.

On multi-label data (multi-hot labels, see :mod:`supcon.evaluation.multilabel`) the classifiers train with
one-vs-rest binary cross-entropy and pre-training passes the label sets to the loss.
"""

from __future__ import annotations

import copy
import time
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from supcon.core import dist
from supcon.core.checkpoint import save_weights
from supcon.core.errors import UsageError
from supcon.core.runtime import Runtime
from supcon.data.augment import AugmentConfig, BatchAugment
from supcon.data.dataset import ImageDataset, Normalize, Split
from supcon.data.imageset import StoredImages
from supcon.data.longtail import class_counts
from supcon.data.prefetch import TrainBatch
from supcon.data.sampler import order_fn
from supcon.evaluation import multilabel
from supcon.evaluation.evaluate import accuracy, encoder_knn, extract_features, predict, predict_logits
from supcon.evaluation.plots import save_view_grid
from supcon.models.build import Classifier, ContrastiveModel, build_classifier, build_contrastive, to_device
from supcon.models.heads import LinearHead
from supcon.train.context import Run
from supcon.train.extras import JointNet, PretrainState, QueueModule, ema_update, momentum_copy
from supcon.train.loop import Phase, StepOut, ddp_share, fit
from supcon.train.optim import trainable_params
from supcon.train.steps import bcl_step, classifier_loss, contrastive_step, correct_predictions

# Keep the uint8 training set on the GPU when it takes at most this share of the free memory: batches
# are then indexed there, with no host copy per step.
_ON_GPU_SHARE = 0.25


def build_augment(kind: str, norm: Normalize | None, crop: bool = True) -> BatchAugment | None:
    """The training-time augmentation of a phase; None = none (plain images).

    "supcon" is the paper's pipeline (crop, flip, colour jitter, grayscale); "crop-flip" the lighter
    one used for cross-entropy baselines and linear probes. Normalisation follows the run's data.
    ``crop=False``: the images come cropped already (stored images, cropped at their own aspect).
    """
    if kind == "none":
        return None
    stats = {"normalize": False} if norm is None else {"normalize": True, "mean": norm.mean, "std": norm.std}
    extra = {"jitter_p": 0.0, "grayscale_p": 0.0} if kind == "crop-flip" else {}
    return BatchAugment(AugmentConfig(mode="supcon", crop=crop, **stats, **extra))


def _feed(train_x, kind: str, norm: Normalize | None, views: int = 1):
    """A phase's augmentation and, for stored images, the ``prepare`` that reads and crops its batches
    ahead in the background (see :mod:`supcon.data.prefetch`)."""
    if not isinstance(train_x, StoredImages):
        return build_augment(kind, norm), None
    augment = build_augment(kind, norm, crop=False)
    if augment is None:
        return None, lambda idx, rng: train_x[idx]
    scale, ratio = augment.config.crop_scale, augment.config.crop_ratio
    return augment, lambda idx, rng: train_x.random_crops(idx, rng, views, scale, ratio)


def wrap_ddp(model: nn.Module, run: Run) -> nn.Module:
    """The module the training step calls: DistributedDataParallel over the process group when there is
    one, compiled with ``torch.compile`` when the config asks; the model itself otherwise.

    With ``sync_bn`` BatchNorm statistics are computed over the global batch (converted in place, so
    the unwrapped model that is checkpointed holds the same modules).
    """
    net = model
    if dist.world_size() > 1:
        if run.cfg.sync_bn:
            for name, child in list(model.named_children()):
                setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        device_ids = [run.rt.device.index] if run.rt.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return torch.compile(net) if run.cfg.compile else net


def training_data(split: Split, rt: Runtime) -> Split:
    """The training split where the steps index it: on the GPU when it fits comfortably (no host
    copy per step), else where it is."""
    if rt.device.type != "cuda" or not isinstance(split.train_x, torch.Tensor):
        return split
    free, _ = torch.cuda.mem_get_info(rt.device)
    if split.train_x.numel() > _ON_GPU_SHARE * free:
        return split
    return Split(split.train_x.to(rt.device), split.train_y.to(rt.device), split.val_x, split.val_y)


def _view_grid(train_x, run: Run, augment: BatchAugment, views: int) -> None:
    """A look at what the encoder is trained on: originals and their augmented views."""
    pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(run.cfg.seed))[:8]
    crops = None
    if isinstance(train_x, StoredImages):
        c = augment.config
        crops = train_x.random_crops(
            pick, np.random.default_rng(run.cfg.seed), views, c.crop_scale, c.crop_ratio
        )
    save_view_grid(train_x[pick], run.dir / "views.png", views=views, augment=augment, crops=crops)


def _inputs(train_x, b: TrainBatch, augment: BatchAugment | None, rt: Runtime, norm, g, views: int = 1):
    """A training batch on the device: augmented views (view-major) or the plain images. Its uint8
    images come prefetched (``b.x``: stored images, views already cropped) or are indexed here."""
    x_uint8 = b.x if b.x is not None else train_x[b.idx]
    if augment is not None:
        v = 1 if b.x is not None else views
        return augment(x_uint8.to(rt.device, non_blocking=True), views=v, generator=g)
    x = rt.images(x_uint8, norm)
    return x.repeat(views, 1, 1, 1) if views > 1 else x


def _val_acc(model: nn.Module, split: Split, data: ImageDataset, rt: Runtime) -> dict:
    if not len(split.val_y):
        return {}
    if data.multilabel:
        scores = predict_logits(model, split.val_x, rt, data.norm)
        val_map = multilabel.mean_ap(scores.numpy(), split.val_y.numpy())
        return {"val_map": round(val_map, 6)} if val_map is not None else {}
    return {"val_acc": round(accuracy(predict(model, split.val_x, rt, data.norm), split.val_y), 6)}


def _train_classifier(name: str, model: Classifier, run: Run, data: ImageDataset, split: Split) -> Classifier:
    """Encoder and classifier trained together with cross-entropy (experiment 1, fine-tuning)."""
    pc, rt = getattr(run.cfg, name), run.rt
    params = trainable_params(model, pc, name)  # freezes first: DDP registers what needs a gradient
    net = wrap_ddp(model, run)
    augment, prepare = _feed(split.train_x, pc.augment, data.norm)
    train = training_data(split, rt)

    def step(b, n_global, g):
        x = _inputs(train.train_x, b, augment, rt, data.norm, g)
        y = train.train_y[b.idx].to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = net(x)
        loss = classifier_loss(logits, y)
        return StepOut(loss, ddp_share(loss, len(b.idx), n_global), correct_predictions(logits, y))

    order = order_fn(split.train_y, run.cfg.data.sampler)
    val_acc = lambda e: _val_acc(model, split, data, rt)  # noqa: E731
    fit(Phase(name, pc, model, params, step, len(split.train_y), val_acc, order=order, prepare=prepare), run)
    return model


def train_ce(run: Run, data: ImageDataset, split: Split) -> Classifier:
    """Experiment 1: encoder and classifier trained together with softmax cross-entropy (multi-label
    data: one-vs-rest binary cross-entropy, and the training accuracy is the exact-match share)."""
    model = build_classifier(run.cfg, data, pretrained=True)
    return _train_classifier("ce", to_device(model, run.rt), run, data, split)


def pretrain(run: Run, data: ImageDataset, split: Split) -> ContrastiveModel:
    """Experiment 2a: contrastive pre-training of the encoder (SupCon with labels, SimCLR without).

    Options of ``loss`` (see :mod:`supcon.train.extras`): ``queue_size`` keeps the keys of past batches,
    which join every anchor's denominator and positives; they are the batch's own detached
    projections, or with ``key_momentum`` those of a momentum copy of the model. ``method=supcon+ce``
    also trains a linear classifier on the encoder's features with cross-entropy (its weights go to
    ``weights/joint.safetensors``, rank 0). Queue, momentum model and classifier are checkpointed
    with the model. Returns the contrastive model.
    """
    cfg, rt = run.cfg, run.rt
    pc, lc = cfg.pretrain, cfg.loss
    model = to_device(build_contrastive(cfg, data, pretrained=True), rt)
    extra = _pretrain_extras(cfg, data, model, rt)
    params = trainable_params(extra.net, pc, "pretrain")
    net = wrap_ddp(extra.net, run)
    views = pc.views
    augment, prepare = _feed(split.train_x, pc.augment, data.norm, views)
    if augment is not None and dist.is_main():
        _view_grid(split.train_x, run, augment, max(views, 4))
    train = training_data(split, rt)
    feed = lambda b, g: _inputs(train.train_x, b, augment, rt, data.norm, g, views)  # noqa: E731
    if lc.method == "bcl":  # classifier and class prototypes trained with the encoder
        counts = class_counts(split.train_y, data.num_classes)
        step = bcl_step(net, lc, rt, feed, train.train_y, views, counts)
    else:
        step = contrastive_step(net, extra, feed, train.train_y, lc, rt, views, data)
    monitor = _knn_monitor(model, cfg, data, split, rt)

    order = order_fn(split.train_y, cfg.data.sampler)
    phase = Phase("pretrain", pc, extra.module, params, step, len(split.train_y), monitor, order, prepare)
    if extra.ema is not None:
        phase.after_step = lambda: ema_update(extra.ema, model, lc.key_momentum)
    fit(phase, run)
    if extra.joint and dist.is_main():
        joint = Classifier(model.encoder, extra.net.classifier)
        save_weights(joint, run.weights("joint"), {"phase": "joint", "config": cfg.to_yaml()})
    return model


def _knn_monitor(model, cfg, data: ImageDataset, split: Split, rt: Runtime):
    """The kNN accuracy (multi-label: mAP) of the encoder every ``knn_every`` epochs: validation split
    against the training set, or the test set when there is no validation split."""

    def monitor(epoch):
        if not cfg.knn_every or (epoch % cfg.knn_every and epoch != cfg.pretrain.epochs):
            return {}
        key, query = ("val_knn_acc", split.val_x) if len(split.val_y) else ("monitor_knn_acc", data.test_x)
        query_y = split.val_y if len(split.val_y) else data.test_y
        bank = (split.train_x, split.train_y)
        acc = encoder_knn(
            model.encoder, bank, (query, query_y), rt, data.norm, cfg.knn_k, cfg.knn_temperature
        )
        key = key.replace("_acc", "_map") if data.multilabel else key  # multi-label: the kNN mAP
        return {key: round(acc, 6)} if acc is not None else {}

    return monitor


class _Extras(NamedTuple):
    net: nn.Module  # what the step calls (wrapped for DDP): the model, or model + classifier
    module: nn.Module  # what is checkpointed: the model alone when nothing else is trained or kept
    ema: nn.Module | None
    queue: QueueModule | None
    joint: bool


def _pretrain_extras(cfg, data: ImageDataset, model: ContrastiveModel, rt: Runtime) -> _Extras:
    """The classifier (supcon+ce), momentum model and queue of a pre-training run, where configured.
    Without any of them the checkpoint holds the model alone, as it always has."""
    lc = cfg.loss
    if lc.queue_size and data.multilabel:
        raise UsageError(
            "loss.queue_size: the memory queue takes single-label data (this data is multi-label)"
        )
    joint = lc.method == "supcon+ce"
    net = model
    if joint:
        head = LinearHead(model.encoder.feature_dim, data.num_classes).to(rt.device)
        net = JointNet(model, head, detach=lc.ce_detach)
    ema = momentum_copy(model) if lc.queue_size and lc.key_momentum else None
    queue = None
    if lc.queue_size:
        dim = cfg.model.projection_dim if cfg.model.projection != "none" else model.encoder.feature_dim
        queue = QueueModule(lc.queue_size, dim, device=rt.device)
    if not (joint or ema is not None or queue is not None):
        return _Extras(model, model, None, None, False)
    return _Extras(net, PretrainState(net, ema, queue), ema, queue, joint)


def train_linear(run: Run, data: ImageDataset, split: Split, encoder: nn.Module) -> Classifier:
    """Experiment 2b: a classifier on the pre-trained encoder.

    By default the encoder is frozen (eval mode, no gradient) and only the classifier learns: the
    linear probe. With ``linear.finetune`` the encoder and the classifier are trained together with
    cross-entropy, starting from the pre-trained weights (a copy: the pre-trained encoder stays as
    it was).
    """
    if run.cfg.linear.finetune:
        model = build_classifier(run.cfg, data, copy.deepcopy(encoder))
        for p in model.parameters():
            p.requires_grad_(True)
        return _train_classifier("linear", to_device(model, run.rt), run, data, split)
    return _train_probe(run, data, split, encoder)


def _train_probe(run: Run, data: ImageDataset, split: Split, encoder: nn.Module) -> Classifier:
    """Only the head learns. Without augmentation the frozen encoder maps each image to the same
    features every epoch, so they are computed once and the head trains on them: the same
    optimisation, far cheaper."""
    rt, pc = run.rt, run.cfg.linear
    augment, prepare = _feed(split.train_x, pc.augment, data.norm)
    model = build_classifier(run.cfg, data, encoder)
    encoder = to_device(encoder, rt).eval()
    encoder.requires_grad_(False)
    head = model.head.to(rt.device)
    head_net = wrap_ddp(head, run)
    train = training_data(split, rt)
    t0 = time.perf_counter()
    feats = extract_features(encoder, split.train_x, rt, data.norm) if augment is None else None
    feature_seconds = time.perf_counter() - t0

    def step(b, n_global, g):
        y = train.train_y[b.idx].to(rt.device, non_blocking=True)
        if feats is not None:
            f = feats[b.idx.to(feats.device)]
        else:
            with torch.no_grad(), rt.autocast():
                f = encoder(_inputs(train.train_x, b, augment, rt, data.norm, g)).float()
        logits = head_net(f)
        loss = classifier_loss(logits, y)
        return StepOut(loss, ddp_share(loss, len(b.idx), n_global), correct_predictions(logits, y))

    def on_epoch_end(epoch):
        out = {"feature_seconds": round(feature_seconds, 3)} if epoch == 1 and feats is not None else {}
        return out | _val_acc(model, split, data, rt)

    # The head alone is what is checkpointed and switched to train mode; the encoder stays in eval.
    # Features computed once need no images read per step.
    prepare = prepare if feats is None else None
    order = order_fn(split.train_y, run.cfg.data.sampler)
    params = list(head.parameters())
    fit(Phase("linear", pc, head, params, step, len(split.train_y), on_epoch_end, order, prepare), run)
    return model
