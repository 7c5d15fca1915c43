"""Encoders: image batch [B, C, H, W] -> feature vector [B, D], built by registry name.

Every encoder has ``feature_dim`` and ``forward_features`` (the representation that heads and
evaluation use; for these models it is the same as ``forward``). The modules below register
themselves on import: ``keras_cnn`` (the Keras example's CNN) and ``resnet`` (ResNets with a CIFAR or
an ImageNet stem). Here: the ``timm:<name>`` family, e.g. ``timm:resnet18`` or
``timm:vit_tiny_patch16_224``: ``timm.create_model(name, pretrained=False, num_classes=0)``, whose
output without a classifier is its pooled representation ``[B, num_features]``. Weights come from
``--pretrained FILE`` as for every encoder (never downloaded). timm is an optional extra.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import torch
from torch import nn

from supcon.core.errors import UsageError
from supcon.core.registry import ENCODERS, register_encoder, register_encoder_family
from supcon.core.schema import short
from supcon.models import resnet as _resnet  # noqa: F401  (registers the ResNets, as keras_cnn does the CNN)
from supcon.models.keras_cnn import KerasCNN, keras_init_

__all__ = ["ENCODERS", "KerasCNN", "TimmEncoder", "build_encoder", "keras_init_", "register_encoder"]


def build_encoder(name: str, **kwargs) -> nn.Module:
    return ENCODERS.get(name)(**kwargs)


_INSTALL = "pip install 'supcon[timm]'"


def import_timm():
    """The timm module, or ``UsageError`` naming the extra to install."""
    try:
        return importlib.import_module("timm")
    except Exception as e:  # absent, or present but broken (e.g. a torchvision for another torch)
        why = "not installed" if isinstance(e, ModuleNotFoundError) else f"unusable ({type(e).__name__}: {e})"
        raise UsageError(f"timm encoders need the timm package, which is {why}: {_INSTALL}") from None


def _check(name: str) -> None:
    # At config validation: fail before any data is loaded, without importing timm (slow) when present.
    try:
        found = importlib.util.find_spec("timm") is not None
    except ValueError:  # in sys.modules without a spec
        found = sys.modules.get("timm") is not None
    if not found:
        raise UsageError(f"encoder 'timm:{name}' needs the timm package, which is not installed: {_INSTALL}")


class TimmEncoder(nn.Module):
    """A timm model as an encoder: float ``[B, C, H, W]`` -> pooled features ``[B, feature_dim]``."""

    def __init__(self, name: str, in_channels: int = 3, image_size: int | None = None):
        super().__init__()
        timm = import_timm()
        kwargs = dict(pretrained=False, num_classes=0, in_chans=in_channels)
        try:
            try:
                # Models with a fixed input size (ViTs' position embeddings) are built for the data's;
                # the others take no img_size and are built without it.
                model = timm.create_model(name, img_size=image_size, **kwargs) if image_size else None
            except TypeError:
                model = None
            model = model if model is not None else timm.create_model(name, **kwargs)
        except RuntimeError as e:  # timm's "Unknown model"
            raise UsageError(f"timm encoder {short(name)}: {str(e)[:200]}") from None
        self.model = model
        self.feature_dim = int(model.num_features)

    @property
    def weights_module(self) -> nn.Module:
        """The module whose names timm checkpoints use (supcon.models.pretrained loads into it)."""
        return self.model

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


@register_encoder_family("timm", check=_check)
def timm_encoder(name: str, in_channels: int = 3, image_size: int | None = None, **_) -> TimmEncoder:
    """``timm:<name>``; the options of the built-in encoders (width, blocks, stem, ...) do not apply."""
    return TimmEncoder(name, in_channels=in_channels, image_size=image_size)
