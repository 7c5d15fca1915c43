"""The BCL model (Zhu et al., CVPR 2022; the loss is :mod:`supcon.losses.bcl`): an encoder with a
projection head, a cosine classifier, and a prototype head that maps the classifier's weight rows to
the class prototypes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

COSINE_SCALE = 30.0  # the authors' NormedLinear scale ``s``


class CosineClassifier(nn.Module):
    """The authors' ``NormedLinear``: ``s * cos(x, w_c)`` with ``s = 30``; features [N, D] -> logits
    [N, C]. ``weight [C, D]`` (rows: classes) starts as random unit rows."""

    def __init__(self, in_dim: int, num_classes: int, scale: float = COSINE_SCALE):
        super().__init__()
        # As the authors' init: uniform entries, each class's row rescaled to norm 1.
        w = torch.empty(num_classes, in_dim).uniform_(-1, 1)
        self.weight = nn.Parameter(w.renorm_(2, 0, 1e-5).mul_(1e5))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T


class BCLModel(nn.Module):
    """Encoder + projection head (the contrastive branch) + classifier (the cross-entropy branch) +
    prototype head, an MLP that maps the classifier's weight rows to the class prototypes.

    ``forward(x [N, ...])`` -> ``(z [N, P], logits [N, C], prototypes [C, P])``, not normalised (the
    loss normalises). One call returns every part, so DistributedDataParallel sees all parameters
    used. Evaluation uses ``encoder`` (features) or ``encoder`` + ``classifier`` (predictions).
    """

    def __init__(
        self, encoder: nn.Module, projection: nn.Module, classifier: nn.Module, prototype_head: nn.Module
    ):
        super().__init__()
        self.encoder = encoder
        self.projection = projection
        self.classifier = classifier
        self.prototype_head = prototype_head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.projection(h), self.classifier(h), self.prototype_head(self.classifier.weight)
