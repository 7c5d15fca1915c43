"""The two models a run trains, each built from a config and the data in one call.

- :class:`Classifier`: encoder + classification head (experiment 1, and the classifier phase).
- :class:`ContrastiveModel`: encoder + projection head (pre-training; the loss sees the projection,
  evaluation the encoder's features).
- :class:`supcon.losses.bcl.BCLModel`: pre-training with ``loss.method=bcl``: the contrastive model plus a
  classifier and class prototypes.

Fine-tuning conventions of a phase (:func:`trainable_params`): the encoder learning at a fraction of
the lr, its BatchNorm layers frozen, its first stages frozen. A frozen BatchNorm stays in eval mode
(running statistics used, not updated) through the loop's ``train()`` of every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from supcon.core import dist
from supcon.core.checkpoint import load_weights
from supcon.core.config import Config
from supcon.core.errors import UsageError
from supcon.core.runtime import Runtime
from supcon.data.dataset import ImageDataset
from supcon.models.bcl import BCLModel, CosineClassifier
from supcon.models.encoders import build_encoder
from supcon.models.heads import DropoutDenseHead, LinearHead, ProjectionHead
from supcon.models.pretrained import load_pretrained


@dataclass(frozen=True)
class Freeze:
    """What of an encoder is frozen: its BatchNorm layers (``bn``), its stem and first ``stages - 1``
    stages (``stages``; 0: none)."""

    bn: bool = False
    stages: int = 0


def _frozen_parts(encoder: nn.Module, freeze: Freeze) -> tuple[list[nn.Module], list[nn.Module]]:
    """(modules whose parameters are frozen, BatchNorm layers kept in eval mode), found by structure
    so that they are found again after SyncBatchNorm replaced the layers."""
    parts = []
    if freeze.stages:
        stages = encoder.stages()
        parts = stages[: freeze.stages]
    bns = [m for part in parts for m in part.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if freeze.bn:
        bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return parts + bns, bns


class _Frozen(nn.Module):
    """A model whose encoder's frozen BatchNorm layers stay in eval mode whatever ``train()`` says."""

    freeze = Freeze()

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze != Freeze():
            for m in _frozen_parts(self.encoder, self.freeze)[1]:
                m.eval()
        return self


def freeze_encoder(model: nn.Module, freeze: Freeze, where: str = "phase") -> None:
    """Freeze ``model.encoder``'s parts (parameters without gradient; BatchNorm in eval mode, kept
    there by ``model.train()``). ``UsageError`` for stages of an encoder without them."""
    if freeze.stages:
        stages = getattr(model.encoder, "stages", None)
        if stages is None:
            raise UsageError(
                f"{where}.freeze_stages: only the ResNet encoders have stages to freeze, "
                f"not {type(model.encoder).__name__}"
            )
        if freeze.stages > len(stages()):
            raise UsageError(
                f"{where}.freeze_stages={freeze.stages}: this encoder has a stem and "
                f"{len(stages()) - 1} stages (at most {len(stages())})"
            )
    model.freeze = freeze
    for m in _frozen_parts(model.encoder, freeze)[0]:
        m.requires_grad_(False)
    model.train(model.training)


class Classifier(_Frozen):
    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class ContrastiveModel(_Frozen):
    """Encoder + projection head; the loss sees the projection, evaluation the encoder's features."""

    def __init__(self, encoder: nn.Module, projection: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder(x))


def build_encoder_for(cfg: Config, data: ImageDataset, pretrained: bool = False) -> nn.Module:
    """The encoder of ``cfg`` for ``data``'s images; with ``pretrained``, starting from the weights
    of ``model.pretrained`` when set (a phase that trains; a finished phase's saved weights need not)."""
    m = cfg.model
    encoder = build_encoder(
        m.encoder,
        in_channels=data.channels,
        image_size=data.image_size,
        feature_dim=m.feature_dim,
        width=m.width,
        blocks=m.blocks,
        stem=m.stem,
    )
    if pretrained and m.pretrained is not None:
        load_pretrained(encoder, m.pretrained, verbose=dist.is_main())
    return encoder


def build_head(cfg: Config, in_dim: int, num_classes: int) -> nn.Module:
    m = cfg.model
    if m.classifier == "linear":
        return LinearHead(in_dim, num_classes)
    return DropoutDenseHead(in_dim, num_classes, hidden=m.classifier_hidden, dropout=m.dropout)


def build_projection(cfg: Config, in_dim: int) -> nn.Module:
    m = cfg.model
    if m.projection == "none":
        return nn.Identity()
    return ProjectionHead(
        in_dim,
        m.projection_dim,
        hidden_dim=m.projection_hidden,
        kind=m.projection,
        batch_norm=m.projection_bn,
    )


def build_classifier(
    cfg: Config, data: ImageDataset, encoder: nn.Module | None = None, pretrained: bool = False
) -> Classifier:
    """A classifier for ``data``: on ``encoder`` when given, else on a fresh one (``pretrained``: see
    :func:`build_encoder_for`)."""
    encoder = encoder if encoder is not None else build_encoder_for(cfg, data, pretrained)
    return Classifier(encoder, build_head(cfg, encoder.feature_dim, data.num_classes))


def build_contrastive(
    cfg: Config, data: ImageDataset, pretrained: bool = False
) -> ContrastiveModel | BCLModel:
    if cfg.loss.method == "bcl":
        return build_bcl(cfg, data, pretrained)
    encoder = build_encoder_for(cfg, data, pretrained)
    return ContrastiveModel(encoder, build_projection(cfg, encoder.feature_dim))


def build_bcl(cfg: Config, data: ImageDataset, pretrained: bool = False) -> BCLModel:
    """BCL's model: the contrastive model plus a cosine classifier and a prototype head (the
    authors' MLP with BatchNorm) from the classifier's weights to the projection's space."""
    encoder = build_encoder_for(cfg, data, pretrained)
    d, m = encoder.feature_dim, cfg.model
    out_dim = d if m.projection == "none" else m.projection_dim
    prototype_head = ProjectionHead(d, out_dim, hidden_dim=m.projection_hidden, kind="mlp", batch_norm=True)
    classifier = CosineClassifier(d, data.num_classes)
    return BCLModel(encoder, build_projection(cfg, d), classifier, prototype_head)


def build_joint(cfg: Config, data: ImageDataset) -> Classifier:
    """The classifier ``supcon+ce`` pre-training trains beside the loss: a linear head on the encoder."""
    encoder = build_encoder_for(cfg, data)
    return Classifier(encoder, LinearHead(encoder.feature_dim, data.num_classes))


BUILDERS = {
    "ce": build_classifier,
    "pretrain": build_contrastive,
    "linear": build_classifier,
    "joint": build_joint,
}


def load_phase_model(cfg: Config, data: ImageDataset, phase: str, path: Path) -> nn.Module:
    """The model a finished phase saved: its architecture from ``cfg``, its weights from ``path``
    (classifier files hold the whole classifier, encoder included)."""
    return load_weights(BUILDERS[phase](cfg, data), path)


def to_device(model: nn.Module, rt: Runtime) -> nn.Module:
    model = model.to(rt.device)
    return model.to(memory_format=torch.channels_last) if rt.channels_last else model
