"""Optimisers (SGD, Adam, AdamW, LARS) and per-iteration learning-rate schedules.

``build_optimizer`` splits parameters into two groups: weights that get weight decay, and 1-D
parameters (biases and the affine parameters of norm layers) that get none and that LARS leaves out of
its trust-ratio adaptation, as is usual for large-batch contrastive training (SimCLR, SupCon).
:func:`backbone_groups` doubles that split for fine-tuning: the backbone's groups learn at a fraction
of the lr (a group's ``lr_scale``), the heads' at the lr.

Schedules are ``LambdaLR`` multipliers of the base lr, stepped once per iteration, so the trainer can
``state_dict()`` the scheduler with the optimizer for an exact resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from supcon.core.config import PhaseConfig
from supcon.core.errors import UsageError
from supcon.core.registry import Registry
from supcon.core.schema import short
from supcon.models.build import Freeze, freeze_encoder

ParamsLike = nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def scale_lr(lr: float, batch_size: int, base: int = 256) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``lr * batch_size / base``."""
    return lr * batch_size / base


def param_groups(params_or_model: ParamsLike, weight_decay: float) -> list[dict[str, Any]]:
    """Split into ``[{params: >=2-D, weight_decay}, {params: 1-D, weight_decay: 0, lars_exclude: True}]``.

    1-D parameters are the biases and the norm layers' scales and shifts; decaying them towards 0 only
    hurts. Parameters with ``requires_grad=False`` (a frozen encoder) are left out. A list of group
    dicts is passed through unchanged, so callers can build their own groups.
    """
    if isinstance(params_or_model, nn.Module):
        params = [p for p in params_or_model.parameters() if p.requires_grad]
    else:
        params = list(params_or_model)
        if params and isinstance(params[0], dict):
            return params
        params = [p for p in params if p.requires_grad]
    if not params:
        raise UsageError("no trainable parameters to optimise")
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


def backbone_groups(
    model: nn.Module, backbone: nn.Module, weight_decay: float, backbone_lr_scale: float
) -> list[dict[str, Any]]:
    """``param_groups`` of ``model``'s other parameters (heads: the lr), then of ``backbone``'s
    (``lr_scale=backbone_lr_scale``: ``build_optimizer`` gives them ``lr * backbone_lr_scale``).

    The heads come first, so a log of the first group's lr shows the base lr. Schedules multiply
    every group's initial lr, so the ratio holds through warm-up and decay.
    """
    inside = {id(p) for p in backbone.parameters()}
    head = [p for p in model.parameters() if id(p) not in inside and p.requires_grad]
    body = [p for p in backbone.parameters() if p.requires_grad]
    if not head and not body:
        raise UsageError("no trainable parameters to optimise")
    groups = param_groups(head, weight_decay) if head else []
    if body:
        groups += [g | {"lr_scale": backbone_lr_scale} for g in param_groups(body, weight_decay)]
    return groups


def _scaled(groups: list[dict[str, Any]], lr: float) -> list[dict[str, Any]]:
    """Groups with an ``lr_scale`` get their own lr (copies: the caller's dicts stay as they are)."""
    out = []
    for g in groups:
        g = dict(g)
        if "lr_scale" in g:
            g["lr"] = lr * g.pop("lr_scale")
        out.append(g)
    return out


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017).

    For each parameter tensor ``w`` with gradient ``g``: ``d = g + weight_decay * w``, trust ratio
    ``q = eta * ||w|| / ||d||`` (1 when either norm is 0), ``buf = momentum * buf + q * d``,
    ``w -= lr * buf`` (Nesterov: ``w -= lr * (q * d + momentum * buf)``). This is the form of the
    SimCLR/Barlow Twins implementations with the lr outside the momentum buffer, as torch's SGD.

    Parameters in a group with ``lars_exclude=True``, and, with ``exclude_1d=True``, every 1-D
    parameter (biases, norm layers), get neither weight decay nor the trust ratio: plain momentum SGD.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
        exclude_1d: bool = True,
        lars_exclude: bool = False,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(
                f"invalid LARS hyper-parameters lr={lr} momentum={momentum} wd={weight_decay} eta={eta}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            nesterov=nesterov,
            exclude_1d=exclude_1d,
            lars_exclude=lars_exclude,
        )
        super().__init__(params, defaults)

    @staticmethod
    def trust_ratio(p: torch.Tensor, d: torch.Tensor, eta: float) -> torch.Tensor:
        """``eta * ||p|| / ||d||``, or 1 when either norm is 0 (a fresh zero tensor, or no gradient)."""
        pn, dn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
        one = torch.ones_like(pn)
        return torch.where((pn > 0) & (dn > 0), eta * pn / dn, one)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                excluded = group["lars_exclude"] or (group["exclude_1d"] and p.ndim <= 1)
                if not excluded:
                    if group["weight_decay"]:
                        d = d.add(p, alpha=group["weight_decay"])
                    d = d * self.trust_ratio(p, d, group["eta"])
                m = group["momentum"]
                if m:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.detach().clone()
                    else:
                        buf.mul_(m).add_(d)
                    d = d.add(buf, alpha=m) if group["nesterov"] else buf
                p.add_(d, alpha=-group["lr"])
        return loss


OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def _sgd(groups, lr, momentum, betas, eps, nesterov, eta, **kw):
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, **kw)


def _fused(groups) -> dict[str, bool]:
    # One fused kernel for the whole update instead of a dozen foreach passes: the same update,
    # faster (docs/performance.md). For float parameters on CPU/CUDA.
    params = [p for g in groups for p in g["params"]]
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if ok else {}


@OPTIMIZERS.register("adam")
def _adam(groups, lr, momentum, betas, eps, nesterov, eta, **kw):
    return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, **(_fused(groups) | kw))


@OPTIMIZERS.register("adamw")
def _adamw(groups, lr, momentum, betas, eps, nesterov, eta, **kw):
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **(_fused(groups) | kw))


@OPTIMIZERS.register("lars")
def _lars(groups, lr, momentum, betas, eps, nesterov, eta, **kw):
    return LARS(groups, lr=lr, momentum=momentum, eta=eta, nesterov=nesterov, **kw)


def build_optimizer(
    params_or_model: ParamsLike,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    nesterov: bool = False,
    eta: float = 0.001,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Optimizer ``name`` (sgd, adam, adamw, lars) over ``param_groups(params_or_model, weight_decay)``.

    Options that do not apply to the chosen optimizer (betas for SGD, momentum for Adam) are ignored;
    ``kwargs`` go to the optimizer's constructor. A group with ``lr_scale`` learns at ``lr * lr_scale``.
    """
    factory = OPTIMIZERS.get(name)
    if lr <= 0:
        raise UsageError(f"learning rate must be positive, got {lr}")
    if weight_decay < 0:
        raise UsageError(f"weight decay must be >= 0, got {weight_decay}")
    groups = _scaled(param_groups(params_or_model, weight_decay), lr)
    return factory(
        groups, lr=lr, momentum=momentum, betas=tuple(betas), eps=eps, nesterov=nesterov, eta=eta, **kwargs
    )


@dataclass
class LRSchedule:
    """The lr multiplier at (0-based) iteration ``step``; a callable object, so LambdaLR saves it.

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` iterations (so the first step
    is not wasted at lr 0). Then "constant": 1; "cosine": ``min + (1 - min) * (1 + cos(pi * t)) / 2``
    with ``t`` going from 0 at the end of warm-up to 1 at ``total_steps``; "step": ``gamma`` to the power
    of the number of ``milestones`` (iterations) passed.
    """

    name: str
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.name == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, (step - self.warmup_steps) / span)
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.name == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        return 1.0


SCHEDULES = ("constant", "cosine", "step")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
) -> LambdaLR:
    """Per-iteration schedule ``name`` (constant, cosine, step) with linear warm-up; call ``.step()``
    after every optimizer step. For "step", ``milestones`` are iterations; the default, 70/80/90% of
    ``total_steps``, mirrors SupContrast's decay at epochs 700, 800, 900 of 1000.
    """
    if name not in SCHEDULES:
        raise UsageError(f"unknown lr schedule {short(name)}; choose one of: {', '.join(SCHEDULES)}")
    if total_steps < 1 or warmup_steps < 0:
        raise UsageError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise UsageError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if milestones is None:
        milestones = [int(total_steps * f) for f in (0.7, 0.8, 0.9)]
    schedule = LRSchedule(
        name, total_steps, warmup_steps, min_lr_ratio, tuple(int(m) for m in milestones), gamma
    )
    return LambdaLR(optimizer, schedule)


def trainable_params(model: nn.Module, pc: PhaseConfig, where: str = "phase") -> list:
    """What a phase's optimizer gets for ``model`` (encoder + head), after the phase's freezing:
    its parameters, or with ``backbone_lr_scale`` param groups (:func:`backbone_groups`).
    With the defaults, exactly ``list(model.parameters())``."""
    freeze = Freeze(pc.freeze_bn, pc.freeze_stages)
    if freeze != Freeze():
        freeze_encoder(model, freeze, where)
    if pc.backbone_lr_scale == 1.0:
        return list(model.parameters())
    return backbone_groups(model, model.encoder, pc.weight_decay, pc.backbone_lr_scale)
