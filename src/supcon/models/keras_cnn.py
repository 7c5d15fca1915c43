"""The Keras example's encoder and its Keras initialisation."""

from __future__ import annotations

import torch
from torch import nn

from supcon.core.errors import UsageError
from supcon.core.registry import register_encoder
from supcon.models.kernels import conv3x3_pool2_relu, winograd_conv3x3_pool2_relu


def keras_init_(module: nn.Module) -> nn.Module:
    """Initialise as Keras does: Glorot-uniform kernels, zero biases (matters for matching the example)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


@register_encoder("keras-cnn")
class KerasCNN(nn.Module):
    """Conv(32,3x3,valid)-ReLU-MaxPool2-Conv(64,3x3,valid)-ReLU-MaxPool2-Flatten-Dense.

    314,432 parameters for 32x32x3 input and ``feature_dim=128``.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, feature_dim: int = 128, **_):
        super().__init__()
        s1 = (image_size - 2) // 2
        s2 = (s1 - 2) // 2
        if s2 < 1:
            raise UsageError(
                f"keras-cnn needs images of at least 10x10 pixels, got {image_size}x{image_size}"
            )
        self.conv1 = nn.Conv2d(in_channels, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc = nn.Linear(64 * s2 * s2, feature_dim)
        # Both poolings floor, so some rows/columns are never read: conv2 needs only 2*s2+2 rows of
        # the first pooling's output, which come from 2*(2*s2+2)+2 input rows. Cropping the input
        # there computes exactly the same outputs with fewer operations.
        self._crop = 2 * (2 * s2 + 2) + 2
        self.feature_dim = feature_dim
        keras_init_(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # max-pool then ReLU equals ReLU then max-pool (ReLU is monotone) and touches 4x fewer
        # elements. On the CPU both are fused kernels; the first also keeps conv1's output (the
        # largest activation) out of memory; the second (in float32) computes conv2 with Winograd's
        # F(2x2, 3x3), each 2x2 output block a pooling window.
        x = x[:, :, : self._crop, : self._crop]
        x = conv3x3_pool2_relu(x, self.conv1)
        x = winograd_conv3x3_pool2_relu(x, self.conv2)
        # Flatten in NHWC order, as Keras does: free for channels_last tensors (no copy).
        return self.fc(x.permute(0, 2, 3, 1).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
