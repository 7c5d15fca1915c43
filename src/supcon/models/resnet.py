"""ResNets (ResNet-18/34/50) with a CIFAR or an ImageNet stem.

The CIFAR stem, as in the SupCon authors' ``resnet_big.py``: a 3x3 stride-1 conv and no max-pool, so
a 32x32 image reaches the last stage at 4x4. The ImageNet stem, as torchvision's and timm's ResNets:
a 7x7 stride-2 conv, BN, ReLU and a 3x3 stride-2 max-pool (4x smaller feature maps), for large images.
BasicBlock for 18/34, Bottleneck (expansion 4, stride on the 3x3 conv as torchvision's v1.5) for 50;
global average pooling gives the representation, ``feature_dim = 8 * width * expansion`` (512 for
ResNet-18, 2048 for ResNet-50 at the default width 64). ``width`` and ``blocks`` shrink the network
for small CPU runs.

Parameter names follow each stem's reference so its weights load by name: ``shortcut`` (the
authors' CIFAR models) or ``downsample`` (torchvision/timm) for a block's projection; every other
name (``conv1``, ``bn1``, ``layer1.0.conv1``, ...) is the same in both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from supcon.core.config import Stem, choices
from supcon.core.errors import UsageError
from supcon.core.registry import register_encoder
from supcon.data.dataset import PHOTO_SIZE

# oneDNN's weight gradient of a strided 1x1 convolution with few input channels corrupts the heap or
# segfaults on some CPUs (docs/onednn-bf16-crash.md: float32, channels-last, stride 2, 2 to 7 input
# channels on an AVX2 CPU with oneDNN 3.12; reported under bf16 autocast on another). Such shortcut
# convolutions of narrow ResNets take the stride as a slice instead, which never reaches that kernel.
# Normal widths (16 channels and more in every shortcut) keep the plain convolution.
STRIDED_1X1_GUARD = True
_NARROW = 16


class Conv1x1(nn.Conv2d):
    """A bias-free 1x1 convolution; narrow strided ones avoid oneDNN's strided 1x1 kernels.

    Same parameters and state-dict keys as ``nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)``,
    and the same results: a 1x1 convolution with stride s reads every s-th pixel, so it equals a
    stride-1 convolution of ``x[:, :, ::s, ::s]``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__(in_planes, planes, 1, stride=stride, bias=False)

    def rerouted(self, x: torch.Tensor) -> bool:
        """Whether this call slices instead of striding."""
        return (
            STRIDED_1X1_GUARD
            and self.stride != (1, 1)
            and self.in_channels < _NARROW
            and x.device.type == "cpu"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rerouted(x):
            return F.conv2d(x[:, :, :: self.stride[0], :: self.stride[1]], self.weight)
        return super().forward(x)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """A block's identity path, or a 1x1 projection (+ BN) where the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(Conv1x1(in_planes, out_planes, stride=stride), nn.BatchNorm2d(out_planes))


class _Block(nn.Module):
    """What both blocks share: the projection path under its reference name (``shortcut`` or
    ``downsample``), so that state-dict keys match the checkpoints of that reference."""

    def _add_shortcut(self, in_planes: int, out_planes: int, stride: int, name: str) -> None:
        if name not in ("shortcut", "downsample"):
            raise ValueError(f"shortcut name must be 'shortcut' or 'downsample', got {name!r}")
        self.shortcut_name = name
        self.add_module(name, _shortcut(in_planes, out_planes, stride))

    def identity(self, x: torch.Tensor) -> torch.Tensor:
        return self._modules[self.shortcut_name](x)


class BasicBlock(_Block):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "shortcut"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self._add_shortcut(in_planes, planes * self.expansion, stride, shortcut)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.identity(x))


class Bottleneck(_Block):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "shortcut"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self._add_shortcut(in_planes, planes * self.expansion, stride, shortcut)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.identity(x))


STEMS: tuple[str, ...] = choices(Stem)


def resolve_stem(stem: str, image_size: int | None) -> str:
    """``stem`` with "auto" decided by the image size: the ImageNet stem's 4x reduction suits large
    images; small ones (CIFAR's 32 px) keep full resolution with the CIFAR stem."""
    if stem not in STEMS:
        raise UsageError(f"unknown resnet stem {stem!r}; choose one of: {', '.join(STEMS)}")
    if stem != "auto":
        return stem
    return "imagenet" if image_size is not None and image_size >= PHOTO_SIZE else "cifar"


class ResNet(nn.Module):
    """Encoder: float ``[B, in_channels, H, W]`` -> ``[B, feature_dim]`` (after global average pooling).

    ``width`` is the stem/first-stage channel count (stages have width x 1, 2, 4, 8); ``blocks`` the
    number of blocks per stage (1 to 4 stages; fewer stages end the network earlier). ``stem`` is
    "cifar" (3x3 conv) or "imagenet" (7x7 stride-2 conv + max-pool, torchvision's names).
    ``zero_init_residual`` sets each block's last BN gamma to 0 so blocks start as identities.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks: Sequence[int],
        in_channels: int = 3,
        width: int = 64,
        zero_init_residual: bool = False,
        stem: str = "cifar",
    ):
        super().__init__()
        blocks = tuple(int(b) for b in blocks)
        if not 1 <= len(blocks) <= 4 or min(blocks) < 1:
            raise UsageError(f"resnet blocks must be 1 to 4 positive counts per stage, got {blocks!r}")
        if width < 1 or in_channels < 1:
            raise UsageError(f"resnet width and in_channels must be positive, got {width}, {in_channels}")
        if stem not in ("cifar", "imagenet"):
            raise UsageError(f"resnet stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.blocks = blocks
        self.width = width
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.in_planes = width
        # Named layer1..layer4 as in resnet_big.py and torchvision, so their weights load by name.
        self.layers = [f"layer{i + 1}" for i in range(len(blocks))]
        shortcut = "downsample" if stem == "imagenet" else "shortcut"
        for i, (name, n) in enumerate(zip(self.layers, blocks, strict=True)):
            stage = self._make_stage(block, width * 2**i, n, stride=1 if i == 0 else 2, shortcut=shortcut)
            setattr(self, name, stage)
        self.feature_dim = self.in_planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock | Bottleneck):
                    nn.init.zeros_(m.last_bn().weight)

    def _make_stage(
        self, block: type[nn.Module], planes: int, n: int, stride: int, shortcut: str
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s, shortcut=shortcut))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def stages(self) -> list[nn.Module]:
        """The stem (conv1 + bn1) and then each stage, input side first (for freezing a prefix)."""
        stem = nn.ModuleList([self.conv1, self.bn1])
        return [stem, *(getattr(self, name) for name in self.layers)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for name in self.layers:
            out = getattr(self, name)(out)
        return torch.flatten(self.avgpool(out), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


CifarResNet = ResNet  # the name before the ImageNet stem existed


_DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


def cifar_resnet(
    depth: int,
    in_channels: int = 3,
    width: int = 64,
    blocks: Sequence[int] | None = None,
    zero_init_residual: bool = False,
    stem: str = "cifar",
    image_size: int | None = None,
    **_,
) -> ResNet:
    """ResNet-``depth`` (18, 34 or 50); ``blocks`` overrides the per-stage block counts; ``stem``
    "cifar", "imagenet" or "auto" (by ``image_size``, see :func:`resolve_stem`).

    Other encoder options are accepted and ignored (global pooling fits any size).
    """
    if depth not in _DEPTHS:
        raise UsageError(f"unknown resnet depth {depth!r}; choose one of: {', '.join(map(str, _DEPTHS))}")
    block, default_blocks = _DEPTHS[depth]
    return ResNet(
        block,
        default_blocks if blocks is None else blocks,
        in_channels=in_channels,
        width=width,
        zero_init_residual=zero_init_residual,
        stem=resolve_stem(stem, image_size),
    )


@register_encoder("resnet18")
def resnet18(**kwargs) -> ResNet:
    return cifar_resnet(18, **kwargs)


@register_encoder("resnet34")
def resnet34(**kwargs) -> ResNet:
    return cifar_resnet(34, **kwargs)


@register_encoder("resnet50")
def resnet50(**kwargs) -> ResNet:
    return cifar_resnet(50, **kwargs)
