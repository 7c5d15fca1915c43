"""Heads that sit on an encoder's features."""

from __future__ import annotations

import torch
from torch import nn

from supcon.core.errors import UsageError
from supcon.models.keras_cnn import keras_init_


class DropoutDenseHead(nn.Module):
    """The Keras example's classifier head: Dropout(p) -> Dense(hidden) -> Dropout(p) -> Dense(classes).

    No activation between the dense layers, as in the Keras example. Returns logits [B, classes].
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 64, dropout: float = 0.5):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_dim, hidden),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        keras_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ProjectionHead(nn.Module):
    """SupCon's projection head: features [B, in_dim] -> embedding [B, out_dim], not normalised.

    ``kind="mlp"`` (the paper's head): Linear(in_dim, hidden) -> [BatchNorm1d] -> ReLU -> Linear(hidden,
    out_dim), with ``hidden_dim`` defaulting to ``in_dim`` as in the authors' code; ``kind="linear"``: one
    Linear(in_dim, out_dim). The loss L2-normalises the output, so this module does not.
    """

    KINDS = ("mlp", "linear")

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 128,
        hidden_dim: int | None = None,
        kind: str = "mlp",
        batch_norm: bool = False,
    ):
        super().__init__()
        if kind not in self.KINDS:
            raise UsageError(f"unknown projection head kind {kind!r}; choose one of: {', '.join(self.KINDS)}")
        self.in_dim, self.out_dim, self.kind = in_dim, out_dim, kind
        self.hidden_dim = (hidden_dim or in_dim) if kind == "mlp" else None
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        else:
            hidden = self.hidden_dim
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden, bias=not batch_norm)]
            if batch_norm:
                # The bias would be cancelled by the BN mean subtraction; BN's own shift replaces it.
                layers.append(nn.BatchNorm1d(hidden))
            layers += [nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)]
            self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearHead(nn.Module):
    """Linear probe: frozen features [B, in_dim] -> logits [B, num_classes]."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)
