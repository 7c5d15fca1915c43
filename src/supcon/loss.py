r"""The supervised contrastive loss (Khosla et al., NeurIPS 2020, arXiv:2004.11362).

Notation. The ``V`` views of ``B`` samples are flattened into ``N = B * V`` rows ``z_1 .. z_N``
(L2-normalised unless ``normalize=False``), with similarities ``s_ij = z_i . z_j / tau``. For an
anchor ``i``: ``A(i)`` is every row but ``i`` itself, and ``P(i)`` the rows of ``A(i)`` that are
positives of ``i`` (same label; in SimCLR mode the other views of the same sample).

- ``variant="out"``, the paper's eq. 2 (its recommended form)::

      l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip) / sum_{a in A(i)} exp(s_ia) )
          = logsumexp_{a in A(i)} s_ia - mean_{p in P(i)} s_ip

- ``variant="in"``, eq. 3::

      l_i = -log( 1/|P(i)| * sum_{p in P(i)} exp(s_ip) / sum_{a in A(i)} exp(s_ia) )
          = logsumexp_{a in A(i)} s_ia - logsumexp_{p in P(i)} s_ip + log |P(i)|

- ``variant="npairs"``: what ``tfa.losses.npairs_loss(labels, z @ z.T / tau)`` computes on
  normalised features: a softmax cross-entropy over all ``N`` rows, self included, with soft targets
  spread evenly over ``P(i)`` and ``i`` itself::

      l_i = logsumexp_{a} s_ia - mean_{p in P(i) + {i}} s_ip

The loss is the mean of ``l_i`` over the anchors that have at least one positive (the paper writes
a sum over anchors; the mean keeps the scale independent of the batch size). An anchor without a
positive has no defined ``l_i`` and is left out of the mean (the authors' code counts it as a zero
term instead); a batch without any positive gives a zero that is still attached to the graph (its
gradient is zero). For ``"npairs"`` every anchor counts: it is always its own target.

Temperature scaling is exactly the paper's: the authors' code also multiplies the loss by
``tau / base_temperature`` (0.07); pass ``base_temperature=0.07`` to reproduce that scale.

Computation. The positive term of ``"out"`` and ``"npairs"`` is linear in the similarities, so it
comes from per-class sums of features in O(N * D). Only the log-sum-exp over ``A(i)`` (and over
``P(i)`` for ``"in"``) needs pairwise work. It runs in a custom autograd function, either dense (one
N x N tile whose softmax is kept for the backward) or tiled (``chunk`` anchor rows at a time, the
tiles recomputed in the backward, so extra memory is O(N * (D + chunk))). Both give the same value
and gradient.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from supcon import dist as _dist

__all__ = ["DENSE_MAX_PAIRS", "TILE_PAIRS", "VARIANTS", "SupConLoss", "supcon_loss"]

VARIANTS = ("out", "in", "npairs")

# The dense path keeps one anchors x keys matrix (two for "in") alive until the backward; above this
# many pairs (N = 8192 anchors and keys, 256 MiB in float32) the tiled path is chosen on its own.
DENSE_MAX_PAIRS = 1 << 26
# Automatic tile size of the tiled path: chunk = TILE_PAIRS // N anchor rows, so one tile holds
# about 2**24 float32 logits (64 MiB), whatever N is.
TILE_PAIRS = 1 << 24

_NORM_EPS = 1e-12  # on the squared norm, as tf.math.l2_normalize: zero vectors stay zero


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.square().sum(dim=-1, keepdim=True).clamp_min(_NORM_EPS))


@dataclass(frozen=True)
class _Pairs:
    """Which keys (columns) each anchor (row) is paired with.

    Anchor ``i`` is key ``self_offset + i``. Positives: equal ``q_labels[i] == k_labels[j]``, or
    ``mask[q_rows[i], k_cols[j]]`` in mask mode.
    """

    self_offset: int
    exclude_self: bool
    q_labels: torch.Tensor | None = None
    k_labels: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    q_rows: torch.Tensor | None = None
    k_cols: torch.Tensor | None = None

    def logits(self, q: torch.Tensor, k: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        s = q[r0:r1] @ k.T
        if self.exclude_self:
            c0 = self.self_offset + r0
            s[:, c0 : c0 + (r1 - r0)].diagonal().fill_(-math.inf)
        return s

    def positives(self, r0: int, r1: int) -> torch.Tensor:
        if self.q_labels is not None:
            pos = self.q_labels[r0:r1, None] == self.k_labels[None, :]
        else:
            pos = self.mask[self.q_rows[r0:r1]][:, self.k_cols]
        c0 = self.self_offset + r0
        pos[:, c0 : c0 + (r1 - r0)].diagonal().fill_(False)
        return pos


def _logsumexp_(s: torch.Tensor, probs: bool) -> torch.Tensor:
    """Row-wise log-sum-exp of ``s``, consuming ``s``: afterwards it holds the softmax if ``probs``.

    In place to keep one tile-sized buffer. Rows that are entirely -inf give -inf (and zero
    probabilities) instead of NaN.
    """
    m = s.amax(dim=1, keepdim=True).nan_to_num_(neginf=0.0, posinf=math.inf)
    s.sub_(m).exp_()
    tot = s.sum(dim=1, keepdim=True)
    lse = tot.log().add_(m).squeeze(1)
    if probs:
        s.div_(tot.clamp_min_(torch.finfo(s.dtype).tiny))  # an all -inf row is all 0: it stays 0
    return lse


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


class _RowLogSumExp(torch.autograd.Function):
    """Row-wise log-sum-exp of ``q @ k.T`` over the paired keys, and over the positives if asked.

    ``chunk=None``: one tile, whose softmax is saved for the backward (fast, N x N memory).
    Otherwise tiles of ``chunk`` anchor rows; only ``q``, ``k`` and the results are saved and the
    backward recomputes each tile (O(chunk x N) memory).
    """

    @staticmethod
    def forward(ctx, q, k, pairs: _Pairs, with_pos: bool, chunk: int | None):
        m = q.shape[0]
        lse = lse_pos = q.new_empty(0)
        probs: tuple[torch.Tensor, ...] = ()
        if chunk is None:
            if m > 0:
                s = pairs.logits(q, k, 0, m)
                if with_pos:
                    s_pos = s.masked_fill(~pairs.positives(0, m), -math.inf)
                    lse_pos = _logsumexp_(s_pos, probs=True)
                lse = _logsumexp_(s, probs=True)
                probs = (s, s_pos) if with_pos else (s,)
        else:
            lse = q.new_empty(m)
            lse_pos = q.new_empty(m if with_pos else 0)
            for r0 in range(0, m, chunk):
                r1 = min(m, r0 + chunk)
                s = pairs.logits(q, k, r0, r1)
                if with_pos:
                    s_pos = s.masked_fill(~pairs.positives(r0, r1), -math.inf)
                    lse_pos[r0:r1] = _logsumexp_(s_pos, probs=False)
                lse[r0:r1] = _logsumexp_(s, probs=False)
        ctx.pairs, ctx.with_pos, ctx.chunk = pairs, with_pos, chunk
        ctx.save_for_backward(q, k, lse, lse_pos, *probs)
        ctx.set_materialize_grads(False)
        return lse, lse_pos

    @staticmethod
    @once_differentiable
    def backward(ctx, g, g_pos):
        q, k, lse, lse_pos, *probs = ctx.saved_tensors
        if not ctx.with_pos:
            g_pos = None
        if g is None and g_pos is None:
            return None, None, None, None, None
        if g is None:
            g = torch.zeros_like(lse)
        g = g[:, None]
        g_pos = None if g_pos is None else g_pos[:, None]
        pairs, chunk = ctx.pairs, ctx.chunk
        if q.shape[0] == 0:  # a rank that holds no samples: no term, no gradient
            return torch.zeros_like(q), torch.zeros_like(k), None, None, None
        if chunk is None:
            # d lse_i / d s_ij is the softmax p_ij; scaling rows commutes with the products, so
            # no second N x N matrix is needed unless both outputs carry a gradient.
            p = probs[0]
            if g_pos is None:
                return (p @ k).mul_(g), p.T @ (q * g), None, None, None
            grad_s = p * g + probs[1] * g_pos
            return grad_s @ k, grad_s.T @ q, None, None, None
        dq = torch.empty_like(q)
        dk = torch.zeros_like(k)
        lse = _finite_or_zero(lse)[:, None]
        lse_pos = _finite_or_zero(lse_pos)[:, None] if g_pos is not None else None
        for r0 in range(0, q.shape[0], chunk):
            r1 = min(q.shape[0], r0 + chunk)
            s = pairs.logits(q, k, r0, r1)
            if g_pos is not None:
                p_pos = s.masked_fill(~pairs.positives(r0, r1), -math.inf).sub_(lse_pos[r0:r1]).exp_()
            p = s.sub_(lse[r0:r1]).exp_()
            if g_pos is None:
                torch.mm(p, k, out=dq[r0:r1]).mul_(g[r0:r1])
                dk.addmm_(p.T, q[r0:r1] * g[r0:r1])
            else:
                p.mul_(g[r0:r1]).add_(p_pos.mul_(g_pos[r0:r1]))
                torch.mm(p, k, out=dq[r0:r1])
                dk.addmm_(p.T, q[r0:r1])
        return dq, dk, None, None, None


def _class_stats(q, keys, k_cls, n_cls: int, row_offset: int, variant: str):
    """Positive counts and sums of similarities when positives share a class index ``k_cls``.

    Linear in the similarities, the sum over an anchor's class is ``q_i . (sum of the class's keys)``,
    O(N * D) with no pairwise matrix. Both include the self pair (``self_in`` = 1).
    """
    m = q.shape[0]
    q_cls = k_cls[row_offset : row_offset + m]
    count = _class_counts(k_cls, n_cls, q.dtype)[q_cls]
    pos_dot = None
    if variant != "in":
        sums = keys.new_zeros(n_cls, keys.shape[1]).index_add_(0, k_cls, keys)
        pos_dot = (q * _take_rows(sums, q_cls)).sum(dim=1)
    pairs = _Pairs(row_offset, variant != "npairs", q_labels=q_cls, k_labels=k_cls)
    return count, pos_dot, pairs, 1.0


def _mask_stats(q, keys, mask, key_samples, row_offset: int, variant: str):
    """As :func:`_class_stats` for a sample-level mask; ``self_in`` tells where it held the self pair."""
    m, total = q.shape[0], mask.shape[1]
    q_rows = torch.arange(mask.shape[0], device=q.device).repeat(m // max(mask.shape[0], 1))
    per_sample = _class_counts(key_samples, total, q.dtype)
    count = _rowwise_matmul(mask, per_sample[:, None])[:, 0][q_rows]
    pos_dot = None
    if variant != "in":
        sums = keys.new_zeros(total, keys.shape[1]).index_add_(0, key_samples, keys)
        pos_dot = (q * _take_rows(_rowwise_matmul(mask, sums), q_rows)).sum(dim=1)
    self_in = mask[q_rows, key_samples[row_offset : row_offset + m]].to(q.dtype)
    pairs = _Pairs(row_offset, variant != "npairs", mask=mask, q_rows=q_rows, k_cols=key_samples)
    return count, pos_dot, pairs, self_in


def _class_counts(cls: torch.Tensor, n_cls: int, dtype: torch.dtype) -> torch.Tensor:
    """``bincount(cls, minlength=n_cls)`` as ``dtype``, for ``cls < n_cls``; exact below 2**24 rows.

    ``bincount`` reads the largest value on the host to size its result (a sync on CUDA); the
    bound ``n_cls`` is known, so an ``index_add_`` of ones gives the same counts without one.
    """
    return torch.zeros(n_cls, dtype=dtype, device=cls.device).index_add_(
        0, cls, torch.ones(cls.shape, dtype=dtype, device=cls.device)
    )


def _class_index(labels: torch.Tensor) -> torch.Tensor:
    """``torch.unique(labels, return_inverse=True)[1]``: each label's rank among the distinct labels.

    ``unique`` reads its output size on the host (a sync on CUDA); the ranks come from a sort and a
    running count of where the sorted labels change, whose sizes are those of ``labels``. The
    number of classes is then only bounded by ``labels.numel()``, which callers use as the bound.
    """
    sorted_labels, order = torch.sort(labels)
    change = torch.ones_like(sorted_labels, dtype=torch.long)
    change[1:] = sorted_labels[1:] != sorted_labels[:-1]
    return torch.empty_like(change).scatter_(0, order, change.cumsum_(0).sub_(1))


def _take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` with a backward that is deterministic on the device, so that runs reproduce.

    The backward of advanced indexing (``index_put_`` with accumulation) is nondeterministic on the
    CPU; ``index_select``'s (``index_add_``) is deterministic there but nondeterministic on CUDA,
    where indexing's sort-based backward is the deterministic one (PyTorch's reproducibility notes).
    """
    return t.index_select(0, idx) if t.device.type == "cpu" else t[idx]


def _rowwise_matmul(mask: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``mask.to(rhs.dtype) @ rhs`` a block of rows at a time: no float copy of the whole mask."""
    rows = max(1, TILE_PAIRS // max(mask.shape[1], 1))
    if mask.shape[0] <= rows:
        return mask.to(rhs.dtype) @ rhs
    return torch.cat([mask[i : i + rows].to(rhs.dtype) @ rhs for i in range(0, mask.shape[0], rows)])


def _no_autocast(device_type: str):
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type without autocast has nothing to disable
        return contextlib.nullcontext()


def _check_features(features) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got dtype {features.dtype}")
    if features.dim() == 2:
        features = features.unsqueeze(1)
    if features.dim() != 3:
        raise ValueError(
            "features must have shape [B, V, D] (V views of B samples) or [N, D] (one view each), "
            f"got shape {tuple(features.shape)}"
        )
    if features.shape[1] < 1 or features.shape[2] < 1:
        raise ValueError(
            f"features need at least one view and one dimension, got shape {tuple(features.shape)}"
        )
    return features


def _check_temperature_tensor(t: torch.Tensor) -> float | None:
    """The value of a 0-d tensor temperature if it can be read without waiting for a device."""
    if t.dim() != 0 or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"temperature as a tensor must be a 0-d real tensor, got {t.dtype} {tuple(t.shape)}")
    return float(t.detach()) if t.device.type == "cpu" else None


def _check_options(temperature, variant, chunk_size, base_temperature) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(map(repr, VARIANTS))}")
    checks = []
    if isinstance(temperature, torch.Tensor):
        value = _check_temperature_tensor(temperature)
        if value is not None:  # a device tensor's value is not read: that would wait for the device
            checks.append(("temperature", value))
    else:
        checks.append(("temperature", temperature))
    if base_temperature is not None:
        checks.append(("base_temperature", base_temperature))
    for name, value in checks:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")


def _check_labels(labels, batch: int, device: torch.device) -> tuple[str, torch.Tensor | None]:
    """The mode ("simclr", "labels" or "mask") and the labels on ``device``."""
    if labels is None:
        return "simclr", None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    labels = labels.to(device)
    if labels.dim() == 1:
        if labels.shape[0] != batch:
            raise ValueError(
                f"labels has {labels.shape[0]} entries but features hold {batch} samples "
                "(labels are per sample, not per view)"
            )
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}; use labels.long()")
        return "labels", labels.long() if labels.dtype == torch.bool else labels
    if labels.dim() == 2:
        if labels.shape[0] != batch:
            raise ValueError(
                f"a positive mask must be [B, B] with B = {batch} samples, got shape {tuple(labels.shape)}"
            )
        return "mask", labels if labels.dtype == torch.bool else labels != 0
    raise ValueError(
        f"labels must be [B] class ids or a [B, B] positive mask, got shape {tuple(labels.shape)}"
    )


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.1,
    variant: str = "out",
    normalize: bool = True,
    chunk_size: int | None = None,
    gather: bool = False,
    base_temperature: float | None = None,
) -> torch.Tensor:
    """Supervised contrastive loss of a batch (see the module docstring for the equations).

    Args:
        features: ``[B, V, D]``, ``V`` views of each of ``B`` samples, or ``[N, D]``, one view each.
            The views are flattened view-major (row ``v * B + b`` is view ``v`` of sample ``b``), as
            in the authors' code; the loss does not depend on the order.
        labels: ``[B]`` integer class ids; ``None`` for SimCLR (an anchor's positives are the other
            views of its own sample); or a ``[B, B]`` positive mask, ``mask[i, j]`` true (non-zero)
            when sample ``j`` counts as "same" as sample ``i`` (it may be asymmetric). The mask acts
            on samples: view pairs inherit it, so keep the diagonal true for a sample's own views to
            be positives. The mask ``y[:, None] == y[None, :]`` gives the same loss as the class ids
            ``y``, and ``eye(B)`` the same as ``None``.
        temperature: ``tau`` > 0: a number, or a 0-d tensor (which may require grad, e.g. a learned
            temperature; on an accelerator its value is not checked, as that would wait for it).
        variant: ``"out"`` (eq. 2, default), ``"in"`` (eq. 3) or ``"npairs"`` (tfa's npairs_loss).
        normalize: L2-normalise the features along ``D`` first (``x / max(|x|, 1e-6)``, as
            ``tf.math.l2_normalize``: a zero vector stays zero, no NaN).
        chunk_size: anchor rows per tile of the memory-linear tiled path; setting it forces that
            path. ``None`` picks dense when ``anchors * keys <= DENSE_MAX_PAIRS`` (2**26, N = 8192),
            else tiles of ``TILE_PAIRS // N`` rows.
        gather: all-gather features and labels from every ``torch.distributed`` rank so that each
            local anchor is contrasted with the global batch. A no-op without a process group or
            with one process. See "Across processes" below.
        base_temperature: if given, multiply the loss by ``temperature / base_temperature``, the
            extra factor of the authors' code (which uses 0.07). Off by default: the paper has none.

    Returns:
        A 0-dim tensor. The computation runs in float32, or in float64 for float64 features:
        float16 / bfloat16 features (also from ``torch.autocast``, which is disabled inside) are
        upcast, and the result is float32 for them.

    Raises:
        TypeError: non-tensor or non-floating features, floating-point class ids.
        ValueError: wrong shapes, unknown variant, non-positive temperature or chunk size.

    Across processes (``gather=True``): every rank computes the terms ``l_i`` of its own anchors
    against the keys of all ranks (ranks may hold different ``B``; ``V`` and ``D`` must agree).
    Every rank must call the loss (and its backward): both hold collectives. The value returned on
    every rank is the global loss: the
    mean over all ranks' anchors, exactly the single-process loss of the concatenated batch. Its
    gradient on each rank is that of the local anchors' share of that mean; the gather's backward
    sums the key gradients of all ranks back to their owners, so each rank's features receive
    exactly their slice of the single-process gradient. DistributedDataParallel then *averages*
    parameter gradients over ranks, so to train with the exact global gradient multiply the loss by
    the world size before ``backward()``. A mask must then be ``[B_local, B_global]``: rows are this
    rank's samples, columns all samples in rank order.
    """
    features = _check_features(features)
    _check_options(temperature, variant, chunk_size, base_temperature)
    batch, views, dim = features.shape
    device = features.device
    mode, labels = _check_labels(labels, batch, device)
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    if isinstance(temperature, torch.Tensor):
        # Kept a tensor (reading it would wait for the device), so it may also be a learned one.
        temperature = temperature.to(device=device, dtype=dtype)
    else:
        temperature = float(temperature)

    with _no_autocast(device.type):
        x = features.to(dtype)
        if normalize:
            x = _l2_normalize(x)
        z = x.transpose(0, 1).reshape(views * batch, dim)

        if gather and _dist.world_size() > 1:
            # One exchange of every rank's [B, V, D], read once on the host: the sizes shape the
            # gather (its padding and trimming), so this is the one wait the gather path needs.
            shapes = _dist.all_gather_shapes([batch, views, dim], device)
            if any(s[1:] != shapes[0][1:] for s in shapes):
                raise ValueError(
                    "gather=True needs the same number of views and feature size on every rank, got "
                    f"[B, V, D] = {shapes}"
                )
            sizes = [s[0] for s in shapes]
            rank = _dist.rank()
            keys = _dist.all_gather_with_grad(z, [views * s for s in sizes])
        else:
            sizes, rank, gather = [batch], 0, False
            keys = z
        sample_offset = sum(sizes[:rank])
        row_offset = views * sample_offset
        total = sum(sizes)
        m, n = z.shape[0], keys.shape[0]
        q = z / temperature
        if mode == "labels":
            k_labels = labels.repeat(views) if views > 1 else labels
            if gather:
                k_labels = _dist.all_gather_nograd(k_labels, [views * s for s in sizes])
            # The class of a key: the rank of its label, as torch.unique numbers them; at most n classes.
            count, pos_dot, pairs, self_in = _class_stats(
                q, keys, _class_index(k_labels), n, row_offset, variant
            )
        else:
            # Sample index of every key row in the global order: rank by rank, view-major in a rank.
            key_samples = torch.cat(
                [
                    torch.arange(o, o + s, device=device).repeat(views)
                    for o, s in zip(itertools.accumulate([0, *sizes[:-1]]), sizes, strict=True)
                ]
            )
            if mode == "simclr":  # the classes are the samples
                count, pos_dot, pairs, self_in = _class_stats(
                    q, keys, key_samples, total, row_offset, variant
                )
            else:
                if labels.shape[1] != total:
                    raise ValueError(
                        f"a positive mask must be [B, B] with B = {total} samples"
                        + (f" ([B_local, B_global] = [{batch}, {total}] with gather=True)" if gather else "")
                        + f", got shape {tuple(labels.shape)}"
                    )
                count, pos_dot, pairs, self_in = _mask_stats(
                    q, keys, labels, key_samples, row_offset, variant
                )
        # count and pos_dot include the self pair where self_in is 1; "out" and "in" leave it out,
        # "npairs" always counts it.
        adjust = 1 - self_in if variant == "npairs" else -self_in
        if not isinstance(adjust, float) or adjust != 0:
            count = count + adjust
            if pos_dot is not None:
                pos_dot = pos_dot + adjust * (q * z).sum(dim=1)  # s_ii = q_i . z_i

        if chunk_size is None and m * n > DENSE_MAX_PAIRS:
            chunk_size = max(1, TILE_PAIRS // n)
        lse, lse_pos = _RowLogSumExp.apply(q, keys, pairs, variant == "in", chunk_size)

        loss = _mean_over_anchors(lse, lse_pos, count, pos_dot, variant, gather)
        if base_temperature is not None:
            loss = loss * (temperature / base_temperature)
    return loss


def _mean_over_anchors(lse, lse_pos, count, pos_dot, variant: str, gather: bool) -> torch.Tensor:
    """The mean of the anchors' terms ``l_i``; with ``gather``, over the anchors of every rank."""
    m, dtype, device = lse.shape[0], lse.dtype, lse.device
    if variant == "npairs":  # every anchor is its own target
        local = (lse - pos_dot / count).sum()
        n_valid = float(m)
    else:
        valid = count > 0
        safe_count = count.clamp_min(1)
        per_anchor = lse - lse_pos + safe_count.log() if variant == "in" else lse - pos_dot / safe_count
        # Anchors without positives have no term (their value may be inf); where() also stops
        # their gradient, and an empty batch gives a zero that is still part of the graph.
        local = torch.where(valid, per_anchor, 0.0).sum()
        n_valid = valid.sum().to(dtype)
    if gather:
        count_t = torch.full((), n_valid, dtype=dtype, device=device) if variant == "npairs" else n_valid
        mine = torch.stack([local.detach(), count_t])
        totals = _dist.all_reduce_sum(mine)
        denom = totals[1].clamp_min(1)
        loss = local / denom + (totals[0] - local.detach()) / denom
    elif isinstance(n_valid, float):
        loss = local / max(n_valid, 1.0)
    else:
        loss = local / n_valid.clamp_min(1)
    return loss


class SupConLoss(nn.Module):
    """``nn.Module`` form of :func:`supcon_loss`; ``forward(features, labels=None)``.

    Example::

        criterion = SupConLoss(temperature=0.1)
        loss = criterion(torch.stack([proj(x1), proj(x2)], dim=1), y)  # [B, 2, D], [B]
    """

    def __init__(
        self,
        temperature: float | torch.Tensor = 0.1,
        variant: str = "out",
        normalize: bool = True,
        chunk_size: int | None = None,
        gather: bool = False,
        base_temperature: float | None = None,
    ) -> None:
        super().__init__()
        _check_options(temperature, variant, chunk_size, base_temperature)
        self.temperature = temperature
        self.variant = variant
        self.normalize = normalize
        self.chunk_size = chunk_size
        self.gather = gather
        self.base_temperature = base_temperature

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return supcon_loss(
            features,
            labels,
            temperature=self.temperature,
            variant=self.variant,
            normalize=self.normalize,
            chunk_size=self.chunk_size,
            gather=self.gather,
            base_temperature=self.base_temperature,
        )

    def extra_repr(self) -> str:
        parts = [f"temperature={self.temperature}", f"variant={self.variant!r}"]
        if not self.normalize:
            parts.append("normalize=False")
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        if self.gather:
            parts.append("gather=True")
        if self.base_temperature is not None:
            parts.append(f"base_temperature={self.base_temperature}")
        return ", ".join(parts)
