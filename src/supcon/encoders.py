"""Encoders: image batch [B, C, H, W] -> feature vector [B, D], built by registry name.

Every encoder has ``feature_dim`` and ``forward_features`` (the representation that heads and
evaluation use; for these models it is the same as ``forward``). The modules below register
themselves on import: ``keras_cnn`` (the Keras example's CNN) and ``resnet`` (CIFAR ResNets).
"""

from __future__ import annotations

from torch import nn

from supcon import keras_cnn, resnet  # noqa: F401 (they register their encoders)
from supcon.keras_cnn import KerasCNN, keras_init_
from supcon.registry import ENCODERS, register_encoder

__all__ = ["ENCODERS", "KerasCNN", "build_encoder", "keras_init_", "register_encoder"]


def build_encoder(name: str, **kwargs) -> nn.Module:
    return ENCODERS.get(name)(**kwargs)
