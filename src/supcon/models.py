"""The two models a run trains, each built from a config and the data in one call.

- :class:`Classifier`: encoder + classification head (experiment 1, and the classifier phase).
- :class:`ContrastiveModel`: encoder + projection head (pre-training; the loss sees the projection,
  evaluation the encoder's features).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from supcon.checkpoint import load_weights
from supcon.config import Config
from supcon.datasets import ImageDataset
from supcon.encoders import build_encoder
from supcon.heads import DropoutDenseHead, LinearHead, ProjectionHead
from supcon.runtime import Runtime


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class ContrastiveModel(nn.Module):
    """Encoder + projection head; the loss sees the projection, evaluation the encoder's features."""

    def __init__(self, encoder: nn.Module, projection: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder(x))


def build_encoder_for(cfg: Config, data: ImageDataset) -> nn.Module:
    m = cfg.model
    return build_encoder(
        m.encoder,
        in_channels=data.channels,
        image_size=data.image_size,
        feature_dim=m.feature_dim,
        width=m.width,
        blocks=m.blocks,
    )


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


def build_classifier(cfg: Config, data: ImageDataset, encoder: nn.Module | None = None) -> Classifier:
    """A classifier for ``data``: on ``encoder`` when given, else on a fresh one."""
    encoder = encoder if encoder is not None else build_encoder_for(cfg, data)
    return Classifier(encoder, build_head(cfg, encoder.feature_dim, data.num_classes))


def build_contrastive(cfg: Config, data: ImageDataset) -> ContrastiveModel:
    encoder = build_encoder_for(cfg, data)
    return ContrastiveModel(encoder, build_projection(cfg, encoder.feature_dim))


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
