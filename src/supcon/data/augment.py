"""Batched image augmentation on whole tensors, on the training device.

The SupCon training views (Khosla et al. 2020, as in the authors' SupContrast code for CIFAR):
random resized crop (scale 0.2-1, aspect 3/4-4/3) -> horizontal flip (p=0.5) -> colour jitter
(brightness/contrast/saturation 0.4, hue 0.1) applied with p=0.8 -> grayscale (p=0.2) -> normalize.

Every random choice is drawn per sample and per view from one ``torch.rand`` call, so a batch is
reproducible from a ``torch.Generator`` (whose state a trainer can checkpoint), and the work is a
handful of batched tensor ops rather than a per-image PIL loop.

Layout: input is uint8 ``[B, H, W, C]`` (how datasets are held) or float ``[B, C, H, W]`` in [0, 1].
``aug(x, views=V)`` returns float32 ``[V * B, C, H', W']`` in channels_last memory format, view-major:
row ``v * B + b`` is view ``v`` of image ``b``, so ``out.view(V, B, ...)`` separates the views and an
encoder can take the whole stack in one forward pass. ``split_views`` turns per-row features
``[V * B, D]`` into ``[B, V, D]``, the layout the SupCon loss takes.

Semantics follow torchvision's tensor transforms: integer crop boxes sampled as
``RandomResizedCrop.get_params`` does (10 tries, then the centre-crop fallback), crop-then-resize with
bilinear interpolation that antialiases when shrinking (``antialias=True``), ``ColorJitter`` factors
``U[1-b, 1+b]`` and hue shift ``U[-h, h]`` in HSV, and, by default, a fresh random order of the four
jitter ops for every image (``jitter_order="fixed"`` keeps brightness, contrast, saturation, hue).

This is used rather than kornia's equivalent pipeline (which draws one jitter order per batch), as
that took about twice the CPU time per image on 32x32 batches of 256 and 512 (benchmarks/speed/augment.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from supcon.core.errors import UsageError
from supcon.data.imageops import const, gray, resize_matrix, shift_hue_rows_

# SupContrast's CIFAR-10 statistics (the std values are the ones that code uses, not the per-pixel std).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)
CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params
MODES = ("supcon", "plain")
_MODE_ALIASES = {"none": "plain"}


def _pair(v: Any, name: str) -> tuple[float, float]:
    try:
        a, b = (float(t) for t in v)
    except (TypeError, ValueError):
        raise UsageError(f"augment {name} must be two numbers (low, high), got {v!r}") from None
    if a > b:
        raise UsageError(f"augment {name} must be (low, high) with low <= high, got {v!r}")
    return a, b


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the augmentation.

    ``mode="supcon"`` is the full pipeline; ``mode="plain"`` (alias ``"none"``) only scales to [0, 1] and
    normalizes if ``normalize`` is set, and draws no random numbers. ``size=None`` keeps the input size.
    The crop builds one interpolation matrix per axis and sample and applies them as batched matrix
    products (exact crop-then-resize, antialiased when shrinking).
    """

    mode: str = "supcon"
    size: int | tuple[int, int] | None = None
    crop: bool = True  # False: the images come cropped already (flip, jitter and grayscale only)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_order: str = "random"
    grayscale_p: float = 0.2
    normalize: bool = True
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD

    def __post_init__(self) -> None:
        # Frozen, so fields are set through object.__setattr__; values from YAML arrive as lists.
        set_ = object.__setattr__
        mode = _MODE_ALIASES.get(self.mode, self.mode)
        if mode not in MODES:
            raise UsageError(f"unknown augment mode {self.mode!r}; choose one of: supcon, plain, none")
        set_(self, "mode", mode)
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, int) else tuple(int(s) for s in self.size)
            if len(size) != 2 or min(size) < 1:
                raise UsageError(f"augment size must be a positive int or (height, width), got {self.size!r}")
            set_(self, "size", size)
        scale = _pair(self.crop_scale, "crop_scale")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise UsageError(f"augment crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale!r}")
        ratio = _pair(self.crop_ratio, "crop_ratio")
        if ratio[0] <= 0:
            raise UsageError(f"augment crop_ratio must be positive, got {self.crop_ratio!r}")
        set_(self, "crop_scale", scale)
        set_(self, "crop_ratio", ratio)
        for name in ("flip_p", "jitter_p", "grayscale_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise UsageError(f"augment {name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise UsageError(f"augment {name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.hue <= 0.5:
            raise UsageError(f"augment hue must be in [0, 0.5], got {self.hue!r}")
        if self.jitter_order not in ("random", "fixed"):
            raise UsageError(f"augment jitter_order must be 'random' or 'fixed', got {self.jitter_order!r}")
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(mean) != len(std) or not mean:
            raise UsageError(
                f"augment mean and std must have the same length, got {self.mean!r}, {self.std!r}"
            )
        if min(std) <= 0:
            raise UsageError(f"augment std must be positive, got {self.std!r}")
        set_(self, "mean", mean)
        set_(self, "std", std)


@dataclass
class AugmentParams:
    """The random choices for ``N`` rows (``N = views * batch``, view-major). All tensors have ``N`` rows.

    ``box`` is ``[N, 4]`` int64 (top, left, height, width) in input pixels; ``factors`` is ``[N, 4]``
    (brightness, contrast, saturation factors and hue shift); ``order`` is ``[N, 4]``, the position of
    each jitter op is given by ``order[n, k]`` = the op applied k-th.
    """

    box: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor

    def to(self, device: torch.device | str) -> AugmentParams:
        return AugmentParams(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def crop_fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """``(h, w)`` of RandomResizedCrop's fallback when none of its tries fits: the largest centre crop
    with the image's aspect ratio clamped to ``ratio``."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return int(round(width / ratio[0])), width
    if in_ratio > ratio[1]:
        return height, int(round(height * ratio[1]))
    return height, width


def to_float_nchw(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, C]`` -> float32 ``[B, C, H, W]`` in [0, 1] (a float input must already be NCHW)."""
    if x.dim() != 4:
        raise UsageError(f"expected a batch of images with 4 dimensions, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).float().div_(255.0)
    if not x.is_floating_point():
        raise UsageError(f"expected uint8 [B, H, W, C] or float [B, C, H, W] images, got dtype {x.dtype}")
    return x.float()


def split_views(t: torch.Tensor, views: int) -> torch.Tensor:
    """Rows of a view-major stack ``[V * B, ...]`` -> ``[B, V, ...]`` (a view, no copy)."""
    if t.shape[0] % views:
        raise ValueError(f"{t.shape[0]} rows do not split into {views} views")
    return t.view(views, t.shape[0] // views, *t.shape[1:]).transpose(0, 1)


class BatchAugment:
    """Callable batched augmentation; see the module docstring for layouts and semantics.

    ``aug(x, views=2, generator=g)`` -> float32 ``[2 * B, C, H', W']``, channels_last, view-major.
    """

    def __init__(self, config: AugmentConfig | None = None, **overrides: Any):
        config = config or AugmentConfig()
        self.config = dataclasses.replace(config, **overrides) if overrides else config

    def __repr__(self) -> str:
        return f"BatchAugment({self.config})"

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        return self.config.size or (height, width)

    # -- random parameters -------------------------------------------------------------------------

    def sample_params(
        self,
        n: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> AugmentParams:
        """Draw the random choices for ``n`` rows of ``height x width`` images.

        One ``torch.rand`` call on the generator's device (the CPU when no generator is given, so
        ``torch.manual_seed`` governs it); the result is moved to ``device``.
        """
        c = self.config
        draw_device = generator.device if generator is not None else torch.device("cpu")
        cols = 2 * CROP_TRIES + 2 + 1 + 1 + 4 + 4 + 1
        # float32 as torchvision draws them (and MPS has no float64).
        u = torch.rand(n, cols, generator=generator, device=draw_device, dtype=torch.float32)
        u_area, u_ratio = u[:, :CROP_TRIES], u[:, CROP_TRIES : 2 * CROP_TRIES]
        u_off = u[:, 2 * CROP_TRIES : 2 * CROP_TRIES + 2]
        rest = u[:, 2 * CROP_TRIES + 2 :]
        u_flip, u_jit, u_fac, u_ord, u_gray = rest[:, 0], rest[:, 1], rest[:, 2:6], rest[:, 6:10], rest[:, 10]

        # RandomResizedCrop.get_params, for all rows and all 10 tries at once; first valid try wins.
        area = float(height * width)
        target = area * (c.crop_scale[0] + (c.crop_scale[1] - c.crop_scale[0]) * u_area)
        log_lo, log_hi = math.log(c.crop_ratio[0]), math.log(c.crop_ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.to(torch.uint8).argmax(1, keepdim=True)
        w = w.gather(1, first).squeeze(1)
        h = h.gather(1, first).squeeze(1)
        fh, fw = crop_fallback(height, width, c.crop_ratio)
        found = ok.any(1)
        w = torch.where(found, w, torch.full_like(w, fw))
        h = torch.where(found, h, torch.full_like(h, fh))
        # Uniform integers in [0, H - h]; the min guards u * n rounding up to n in float32.
        top = torch.minimum(torch.floor(u_off[:, 0] * (height - h + 1)), height - h)
        left = torch.minimum(torch.floor(u_off[:, 1] * (width - w + 1)), width - w)
        top = torch.where(found, top, torch.full_like(top, (height - fh) // 2))
        left = torch.where(found, left, torch.full_like(left, (width - fw) // 2))
        box = torch.stack((top, left, h, w), 1).long()

        # Clamped before rounding to float32, which is monotonic: the same as clamping after.
        lo = (
            max(1 - c.brightness, 0.0),
            max(1 - c.contrast, 0.0),
            max(1 - c.saturation, 0.0),
            max(-c.hue, -1.0),
        )
        lo = const(lo, u.dtype, u.device)
        hi = const((1 + c.brightness, 1 + c.contrast, 1 + c.saturation, c.hue), u.dtype, u.device)
        factors = (lo + (hi - lo) * u_fac).float()
        if c.jitter_order == "random":
            order = u_ord.argsort(1)  # a uniform random permutation per row
        else:
            order = torch.arange(4, device=u.device).expand(n, 4).clone()
        params = AugmentParams(
            box=box,
            flip=u_flip < c.flip_p,
            jitter=u_jit < c.jitter_p,
            factors=factors,
            order=order,
            gray=u_gray < c.grayscale_p,
        )
        return params.to(device) if device is not None else params

    # -- applying them -----------------------------------------------------------------------------

    def _crop_flip(self, img: torch.Tensor, p: AugmentParams, views: int) -> torch.Tensor:
        """img [B, C, H, W] float -> [V * B, C, S, T] (crop, resize, flip in one batched op)."""
        B, C, H, W = img.shape
        if not self.config.crop:
            out = img.unsqueeze(0).expand(views, *img.shape).reshape(views * B, C, H, W)
            return torch.where(p.flip.view(-1, 1, 1, 1), out.flip(3), out).contiguous()
        S, T = self.out_size(H, W)
        top, left, h, w = p.box.unbind(1)
        ry = resize_matrix(top, h, H, S).view(views, B, S, H)
        rx = resize_matrix(left, w, W, T)
        # A flip reverses the output columns, i.e. the rows of the column-interpolation matrix.
        rx = torch.where(p.flip.view(-1, 1, 1), rx.flip(1), rx).view(views, B, T, W)
        # out[v, b] = ry[v, b] @ img[b] @ rx[v, b]^T per channel; einsum batches it into matmuls.
        out = torch.einsum("vbsh,bchw,vbtw->vbcst", ry, img, rx)
        return out.reshape(views * B, C, S, T).contiguous()

    def _jitter(self, x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """Colour jitter, in place on ``x`` (contiguous NCHW), with per-row factors and op order.

        Rows with ``jitter`` False are unchanged.

        Brightness, contrast and saturation are all ``clamp(f * x + (1 - f) * ref)`` with ref 0, the
        image's mean luma, or the pixel's luma, so each of the four positions is one pass over all rows
        with a per-row ref (weight 0 for the rows whose op there is not a blend, which leaves them
        exactly unchanged); hue goes to the rows whose op at that position is hue.
        """
        c = self.config
        one = torch.ones_like(p.factors)
        strengths = (c.brightness > 0, c.contrast > 0, c.saturation > 0, c.hue > 0)
        # Identity factors for rows without jitter, and for ops whose strength is 0 (torchvision skips them).
        active = const(strengths, torch.bool, x.device).view(1, 4) & p.jitter.view(-1, 1)
        fac = torch.where(
            active, p.factors, torch.where(torch.arange(4, device=x.device) == _HUE, 0 * one, one)
        )
        rows = torch.arange(x.shape[0], device=x.device)
        any_blend, any_hue = any(strengths[:_HUE]), strengths[_HUE] and x.shape[1] == 3
        for pos in range(4):
            op = p.order[:, pos]
            f = fac[rows, op]
            if any_blend:
                is_blend = (op != _HUE) & active[rows, op]
                # In place on purpose: fresh full-size tensors cost page faults that dominate on CPU.
                ref = gray(x)
                mean = ref.mean((2, 3), keepdim=True)
                is_con = (op == _CONTRAST).view(-1, 1, 1, 1).to(x.dtype)
                ref.mul_((op == _SATURATION).view(-1, 1, 1, 1).to(x.dtype)).addcmul_(mean, is_con)
                # lerp towards ref with weight 1 - f; weight 0 (f = 1) leaves a row exactly unchanged.
                wgt = torch.where(is_blend, 1.0 - f, torch.zeros_like(f)).view(-1, 1, 1, 1)
                x.lerp_(ref.expand_as(x), wgt.expand_as(x)).clamp_(0.0, 1.0)
            if any_hue:
                shift_hue_rows_(x, (op == _HUE) & active[:, _HUE], f)
        return x

    def apply(self, x: torch.Tensor, params: AugmentParams, views: int = 1) -> torch.Tensor:
        """Apply given parameters (``views * B`` rows) to a batch; see ``__call__``."""
        c = self.config
        with torch.no_grad():
            img = to_float_nchw(x)
            B, C = img.shape[:2]
            if c.mode == "plain":
                out = img.unsqueeze(0).expand(views, *img.shape).reshape(views * B, *img.shape[1:])
            else:
                if params.box.shape[0] != views * B:
                    raise ValueError(f"params have {params.box.shape[0]} rows, expected {views * B}")
                img = img.contiguous()
                out = self._crop_flip(img, params, views).clamp_(0.0, 1.0)
                # Decided by the config alone: a test of the drawn values would wait for the device.
                if c.jitter_p > 0 and (c.brightness > 0 or c.contrast > 0 or c.saturation > 0 or c.hue > 0):
                    out = self._jitter(out, params)
                if C == 3 and c.grayscale_p > 0:
                    out = torch.where(params.gray.view(-1, 1, 1, 1), gray(out).expand_as(out), out)
            return self._finish(out)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize (one fused multiply-add) and lay out as channels_last float32."""
        c = self.config
        C = x.shape[1]
        res = torch.empty_like(x, memory_format=torch.channels_last, dtype=torch.float32)
        if not c.normalize:
            return res.copy_(x)
        if len(c.mean) not in (1, C):
            raise UsageError(f"augment mean/std have {len(c.mean)} values but the images have {C} channel(s)")
        mean = const(c.mean, torch.float32, x.device).view(1, -1, 1, 1)
        inv = 1.0 / const(c.std, torch.float32, x.device).view(1, -1, 1, 1)
        return (
            torch.addcmul(-mean * inv, x, inv, out=res) if len(c.mean) == C else res.copy_((x - mean) * inv)
        )

    def __call__(
        self, x: torch.Tensor, views: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Augment a batch: uint8 ``[B, H, W, C]`` or float ``[B, C, H, W]`` in [0, 1].

        Returns float32 ``[views * B, C, H', W']`` (channels_last), row ``v * B + b`` = view ``v`` of
        image ``b``; each row gets its own random crop, flip, jitter and grayscale draw.
        """
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        if self.config.mode == "plain":
            return self.apply(x, _EMPTY_PARAMS, views)
        B = x.shape[0]
        H, W = (x.shape[1], x.shape[2]) if x.dtype == torch.uint8 else (x.shape[2], x.shape[3])
        params = self.sample_params(views * B, H, W, generator=generator, device=x.device)
        return self.apply(x, params, views)


_EMPTY_PARAMS = AugmentParams(*(torch.empty(0) for _ in range(6)))
