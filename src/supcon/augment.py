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
that took about twice the CPU time per image on 32x32 batches of 256 and 512 (benchmarks/augment.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from supcon.errors import UsageError

# SupContrast's CIFAR-10 statistics (the std values are the ones that code uses, not the per-pixel std).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)
_CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params
MODES = ("supcon", "plain")
_MODE_ALIASES = {"none": "plain"}
# On the CPU the hue shift runs on the rows that take it at each position of the random op order
# (a quarter of the work of shifting every row and selecting), at the price of reading on the host
# which rows those are; on other devices that read would wait for the device, so every row is
# shifted and the result selected. Both give identical images; tests switch this to compare them.
_BRANCH_FREE_CPU = False


def _branch_free(device: torch.device) -> bool:
    return device.type != "cpu" or _BRANCH_FREE_CPU


@functools.lru_cache(maxsize=256)
def _cached_const(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _const(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor made once per (values, dtype, device), not uploaded on every call.

    Callers must not modify it. While torch.compile traces, a fresh one is made instead (a cached
    tensor would otherwise be created under, and tied to, the tracing).
    """
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_const(values, dtype, torch.device(device))


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


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Contiguous [N, C, H, W] -> new [N, 1, H, W] luma; a one-channel image's gray is a copy of it."""
    if x.shape[1] == 1:
        return x.clone()
    n, _, h, w = x.shape
    # One batched matrix product is faster on CPU than three scaled channel adds.
    luma = _const(_LUMA, x.dtype, x.device).view(1, 3)
    return torch.matmul(luma, x.reshape(n, 3, h * w)).view(n, 1, h, w)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, [N]) as torchvision's adjust_hue (RGB->HSV->RGB).

    The HSV round trip is written in closed form: value (max) and chroma (max - min) are kept and
    each channel is ``max - chroma * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6h) mod 6``.
    """
    maxc = x.amax(1)
    cr = maxc - x.amin(1)
    r, g, b = x.unbind(1)
    # Grey pixels (chroma 0) get hue 0, as in torchvision; their numerators are 0 too.
    crd = torch.where(cr == 0, torch.ones_like(cr), cr)
    # Hue in sixths of a turn, as torchvision's _rgb2hsv (ties resolved in the order r, g, b).
    h6 = torch.where(maxc == r, g - b, torch.where(maxc == g, 2.0 * cr + b - r, 4.0 * cr + r - g))
    h6 = h6.div_(crd).add_(6.0 * shift.view(-1, 1, 1)).unsqueeze(1)
    n = _const((5.0, 3.0, 1.0), x.dtype, x.device).view(1, 3, 1, 1)
    k = torch.remainder(h6 + n, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return ramp.mul_(cr.unsqueeze(1).neg()).add_(maxc.unsqueeze(1))


def _shift_hue_rows_(x: torch.Tensor, rows: torch.Tensor, shift: torch.Tensor) -> None:
    """``_shift_hue`` in place on the rows of ``x`` where the bool ``rows`` is true."""
    if _branch_free(x.device):
        x.copy_(torch.where(rows.view(-1, 1, 1, 1), _shift_hue(x, shift), x))
        return
    idx = torch.nonzero(rows).squeeze(1)
    if idx.numel():
        x.index_copy_(0, idx, _shift_hue(x.index_select(0, idx), shift.index_select(0, idx)))


def _taps(
    offset: torch.Tensor, length: torch.Tensor, in_len: int, out_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter taps that crop ``[offset, offset + length)`` of an axis and resize it to ``out_len``.

    Returns input indices ``[N, out_len, K]`` (int64) and weights (rows sum to 1): the triangle
    filter of torch's bilinear ``antialias=True`` resize (plain bilinear when enlarging), clipped to
    the crop box and renormalised, i.e. exactly ``F.interpolate(x[..., offset:offset + length],
    out_len, mode="bilinear", antialias=True)`` along that axis. ``K`` is fixed by the sizes alone
    (2 unless shrinking), so no per-batch host sync is needed.
    """
    dtype = torch.float32
    off = offset.to(dtype).unsqueeze(1)
    end = off + length.to(dtype).unsqueeze(1)
    scale = (end - off) / out_len
    support = scale.clamp(min=1.0)
    k = math.ceil(2 * max(1.0, in_len / out_len))
    u = torch.arange(out_len, device=offset.device, dtype=dtype)
    center = off + (u + 0.5) * scale - 0.5  # [N, out], in input pixel-index coordinates
    # The first integer strictly inside (center - support, center + support), then K - 1 more.
    j = (torch.floor(center - support) + 1).unsqueeze(-1) + torch.arange(k, device=offset.device, dtype=dtype)
    w = (1.0 - (j - center.unsqueeze(-1)).abs_() / support.unsqueeze(-1)).clamp_(min=0.0)
    w = w.mul_((j >= off.unsqueeze(-1)) & (j < end.unsqueeze(-1)))
    w = w.div_(w.sum(-1, keepdim=True))
    return j.clamp_(0, in_len - 1).long(), w


def _resize_matrix(offset: torch.Tensor, length: torch.Tensor, in_len: int, out_len: int) -> torch.Tensor:
    """The taps of ``_taps`` as dense per-sample interpolation matrices ``[N, out_len, in_len]``."""
    idx, w = _taps(offset, length, in_len, out_len)
    return torch.zeros(idx.shape[0], out_len, in_len, device=w.device, dtype=w.dtype).scatter_add_(2, idx, w)


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
        cols = 2 * _CROP_TRIES + 2 + 1 + 1 + 4 + 4 + 1
        # float32 as torchvision draws them (and MPS has no float64).
        u = torch.rand(n, cols, generator=generator, device=draw_device, dtype=torch.float32)
        u_area, u_ratio = u[:, :_CROP_TRIES], u[:, _CROP_TRIES : 2 * _CROP_TRIES]
        u_off = u[:, 2 * _CROP_TRIES : 2 * _CROP_TRIES + 2]
        rest = u[:, 2 * _CROP_TRIES + 2 :]
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
        # Fallback when no try fits: the largest centre crop with the aspect ratio clamped to the range.
        in_ratio = width / height
        if in_ratio < c.crop_ratio[0]:
            fw, fh = width, int(round(width / c.crop_ratio[0]))
        elif in_ratio > c.crop_ratio[1]:
            fw, fh = int(round(height * c.crop_ratio[1])), height
        else:
            fw, fh = width, height
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
        lo = _const(lo, u.dtype, u.device)
        hi = _const((1 + c.brightness, 1 + c.contrast, 1 + c.saturation, c.hue), u.dtype, u.device)
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
        ry = _resize_matrix(top, h, H, S).view(views, B, S, H)
        rx = _resize_matrix(left, w, W, T)
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
        active = _const(strengths, torch.bool, x.device).view(1, 4) & p.jitter.view(-1, 1)
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
                ref = _gray(x)
                mean = ref.mean((2, 3), keepdim=True)
                is_con = (op == _CONTRAST).view(-1, 1, 1, 1).to(x.dtype)
                ref.mul_((op == _SATURATION).view(-1, 1, 1, 1).to(x.dtype)).addcmul_(mean, is_con)
                # lerp towards ref with weight 1 - f; weight 0 (f = 1) leaves a row exactly unchanged.
                wgt = torch.where(is_blend, 1.0 - f, torch.zeros_like(f)).view(-1, 1, 1, 1)
                x.lerp_(ref.expand_as(x), wgt.expand_as(x)).clamp_(0.0, 1.0)
            if any_hue:
                _shift_hue_rows_(x, (op == _HUE) & active[:, _HUE], f)
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
                    out = torch.where(params.gray.view(-1, 1, 1, 1), _gray(out).expand_as(out), out)
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
        mean = _const(c.mean, torch.float32, x.device).view(1, -1, 1, 1)
        inv = 1.0 / _const(c.std, torch.float32, x.device).view(1, -1, 1, 1)
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


def save_view_grid(
    x_uint8: torch.Tensor,
    path: str | Path,
    views: int = 4,
    n: int = 8,
    augment: BatchAugment | AugmentConfig | None = None,
    generator: torch.Generator | None = None,
    seed: int = 0,
    zoom: int = 3,
    pad: int = 2,
    crops: torch.Tensor | None = None,
) -> Path:
    """Write a PNG: one row per image (the first ``n``), the original then ``views`` augmented views.

    Views are shown before normalization (the config's ``normalize`` is switched off for the picture),
    each tile enlarged ``zoom`` times with nearest-neighbour so small images stay legible. ``crops``:
    the views already cropped (uint8 ``[views * n, S, S, C]``, view-major; stored images), which the
    augmentation then only flips and colours.
    """
    from PIL import Image

    if isinstance(augment, AugmentConfig) or augment is None:
        augment = BatchAugment(augment)
    shown = BatchAugment(augment.config, normalize=False)
    x = x_uint8[:n]
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        orig = to_float_nchw(x.cpu())
        if crops is not None:
            aug = shown(crops.cpu(), views=1, generator=generator)
        else:
            aug = shown(x.cpu(), views=views, generator=generator)
    B, C, H, W = orig.shape
    S, T = aug.shape[2:]
    th, tw = max(H, S), max(W, T)
    cols = views + 1
    canvas = torch.ones(C, B * (th + pad) + pad, cols * (tw + pad) + pad + pad)
    for b in range(B):
        y0 = pad + b * (th + pad)
        canvas[:, y0 : y0 + H, pad : pad + W] = orig[b]
        for v in range(views):
            # An extra gap separates the original from its views.
            x0 = 2 * pad + (v + 1) * (tw + pad)
            canvas[:, y0 : y0 + S, x0 : x0 + T] = aug[v * B + b]
    arr = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2).permute(1, 2, 0)
    arr = arr[..., 0] if C == 1 else arr
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.contiguous().numpy()).save(path)
    return path
