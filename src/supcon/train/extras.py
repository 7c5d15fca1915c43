"""Pre-training beyond one batch: a label queue of past keys, the momentum (EMA) encoder that may
compute them, and a jointly trained classifier, held in modules so that checkpoints carry them.

- :class:`QueueModule`: a :class:`supcon.losses.queue.LabelQueue` whose contents and position are the
  module's extra state, so ``state_dict()`` / ``load_state_dict()`` save and restore them exactly.
- :func:`momentum_copy` / :func:`ema_update`: the key model, ``ema = m * ema + (1 - m) * online``
  after each optimizer step (MoCo v2), buffers (BatchNorm statistics) copied.
- :class:`JointNet`: encoder + projection head + a linear classifier on the first view's features
  (``supcon+ce``), one forward for the loss and the cross-entropy.
- :class:`PretrainState`: what the pre-training phase checkpoints when it holds more than the model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from supcon.losses.queue import LabelQueue


class QueueModule(nn.Module):
    """A :class:`LabelQueue` as a module: its features, labels and write position travel in
    ``state_dict()`` as extra state. It lives on ``device`` from the start (``.to()`` leaves it)."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.queue = LabelQueue(size, dim, device=device)

    def get_extra_state(self) -> dict:
        return self.queue.state_dict()

    def set_extra_state(self, state: dict) -> None:
        self.queue.load_state_dict(state)

    def extra_repr(self) -> str:
        return repr(self.queue)


def momentum_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` (no gradient; its parameters belong to no optimizer)."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, online: nn.Module, momentum: float) -> None:
    """``ema = momentum * ema + (1 - momentum) * online`` for every parameter; buffers (BatchNorm
    running statistics, counters) are copied from ``online``. Both models have the same structure."""
    e_params, o_params = list(ema.parameters()), [p.detach() for p in online.parameters()]
    if len(e_params) != len(o_params):
        raise ValueError(f"ema_update: {len(e_params)} parameters vs {len(o_params)} in the online model")
    torch._foreach_mul_(e_params, momentum)
    torch._foreach_add_(e_params, o_params, alpha=1.0 - momentum)
    for e, o in zip(ema.buffers(), online.buffers(), strict=True):
        e.copy_(o)


class JointNet(nn.Module):
    """A contrastive model and a classifier on its encoder's features, one forward.

    ``forward(x)`` with ``x`` ``[V*B, C, H, W]`` (view-major) returns ``(z [V*B, D], logits [V*B,
    classes])``; the step keeps the first view's logits (rows ``:B``). With ``detach`` the
    cross-entropy reaches only the classifier, not the encoder.
    """

    def __init__(self, model: nn.Module, classifier: nn.Module, detach: bool = True) -> None:
        super().__init__()
        self.model = model
        self.classifier = classifier
        self.detach = detach

    @property
    def encoder(self) -> nn.Module:  # what the fine-tuning conventions freeze and scale
        return self.model.encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model.encoder(x)
        return self.model.projection(h), self.classifier(h.detach() if self.detach else h)


class PretrainState(nn.Module):
    """The pre-training phase's checkpointed module: the trained network (a ``ContrastiveModel`` or a
    :class:`JointNet`), the momentum model (``None`` without) and the queue (``None`` without)."""

    def __init__(self, net: nn.Module, ema: nn.Module | None, queue: QueueModule | None) -> None:
        super().__init__()
        self.net = net
        self.ema = ema
        self.queue = queue
