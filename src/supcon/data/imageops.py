"""The batched tensor operations the augmentation (:mod:`supcon.data.augment`) is built from: luma,
hue rotation, and crop-and-resize filter taps, each on whole batches with per-row parameters and no
wait for the device.
"""

from __future__ import annotations

import functools
import math

import torch

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
LUMA = (0.2989, 0.587, 0.114)


# On the CPU the hue shift runs on the rows that take it at each position of the random op order
# (a quarter of the work of shifting every row and selecting), at the price of reading on the host
# which rows those are; on other devices that read would wait for the device, so every row is
# shifted and the result selected. Both give identical images; tests switch this to compare them.
BRANCH_FREE_CPU = False


def branch_free(device: torch.device) -> bool:
    return device.type != "cpu" or BRANCH_FREE_CPU


@functools.lru_cache(maxsize=256)
def _cached_const(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def const(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor made once per (values, dtype, device), not uploaded on every call.

    Callers must not modify it. While torch.compile traces, a fresh one is made instead (a cached
    tensor would otherwise be created under, and tied to, the tracing).
    """
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_const(values, dtype, torch.device(device))


def gray(x: torch.Tensor) -> torch.Tensor:
    """Contiguous [N, C, H, W] -> new [N, 1, H, W] luma; a one-channel image's gray is a copy of it."""
    if x.shape[1] == 1:
        return x.clone()
    n, _, h, w = x.shape
    # One batched matrix product is faster on CPU than three scaled channel adds.
    luma = const(LUMA, x.dtype, x.device).view(1, 3)
    return torch.matmul(luma, x.reshape(n, 3, h * w)).view(n, 1, h, w)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
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
    n = const((5.0, 3.0, 1.0), x.dtype, x.device).view(1, 3, 1, 1)
    k = torch.remainder(h6 + n, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return ramp.mul_(cr.unsqueeze(1).neg()).add_(maxc.unsqueeze(1))


def shift_hue_rows_(x: torch.Tensor, rows: torch.Tensor, shift: torch.Tensor) -> None:
    """``shift_hue`` in place on the rows of ``x`` where the bool ``rows`` is true."""
    if branch_free(x.device):
        x.copy_(torch.where(rows.view(-1, 1, 1, 1), shift_hue(x, shift), x))
        return
    idx = torch.nonzero(rows).squeeze(1)
    if idx.numel():
        x.index_copy_(0, idx, shift_hue(x.index_select(0, idx), shift.index_select(0, idx)))


def taps(
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


def resize_matrix(offset: torch.Tensor, length: torch.Tensor, in_len: int, out_len: int) -> torch.Tensor:
    """The taps of ``taps`` as dense per-sample interpolation matrices ``[N, out_len, in_len]``."""
    idx, w = taps(offset, length, in_len, out_len)
    return torch.zeros(idx.shape[0], out_len, in_len, device=w.device, dtype=w.dtype).scatter_add_(2, idx, w)
