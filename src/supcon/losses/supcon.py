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

Extra keys (``keys``, e.g. a memory queue, MoCo-style). ``M`` constant vectors ``k_1 .. k_M`` with
labels join every anchor's sets: ``A(i)`` becomes every row but ``i`` plus all ``M`` keys, with
``s_ik = z_i . k_k / tau``, and ``P(i)`` also holds the keys that share ``i``'s label (none in SimCLR
mode: there every key is a negative). The equations above are unchanged on these larger sets, so an
anchor whose class has no other row in the batch still has a term when a key carries its class.
Keys are never anchors and take no gradient. ``"npairs"`` with keys is the softmax cross-entropy
over the ``N + M`` logits of row ``i`` with targets spread evenly over ``P(i) + {i}`` (positive keys
included), i.e. tfa's npairs_loss on the logits ``z @ [z; k].T / tau``.

Multi-label (``multilabel``, after MulSupCon, Zhang & Wu, AAAI 2024). Each sample has a label set
``Y_i`` (a multi-hot row). A pair ``(i, j)``, ``j`` in ``A(i)``, gets the weight
``w_ij = |Y_i & Y_j| / |Y_i | Y_j|`` (``"jaccard"``; 0 when both sets are empty) or
``w_ij = 1 if |Y_i & Y_j| > 0 else 0`` (``"any"``), and ``P(i) = {j in A(i): w_ij > 0}``. A sample's
other views have ``w = 1`` unless its label set is empty. With ``W_i = sum_{p in P(i)} w_ip``::

      "out":    l_i = -1/W_i * sum_{p in P(i)} w_ip * log( exp(s_ip) / sum_{a in A(i)} exp(s_ia) )
                    = logsumexp_{a in A(i)} s_ia - 1/W_i * sum_p w_ip s_ip
      "in":     l_i = -log( 1/W_i * sum_{p in P(i)} w_ip * exp(s_ip) / sum_{a in A(i)} exp(s_ia) )
                    = logsumexp_{a in A(i)} s_ia - logsumexp_{p in P(i)} (s_ip + log w_ip) + log W_i
      "npairs": l_i = logsumexp_{a} s_ia - (s_ii + sum_{p in P(i)} w_ip s_ip) / (1 + W_i)

(the anchor is its own target with weight 1). With ``"any"`` these are eq. 2, eq. 3 and npairs with
"shares a label" as the positive relation. Samples without any label have no positive: they stay
in the denominators of the others and are left out of the mean (for ``"npairs"`` they are their
own only target). Extra keys take part with their own multi-hot labels.

Temperature scaling is exactly the paper's: the authors' code also multiplies the loss by
``tau / base_temperature`` (0.07); pass ``base_temperature=0.07`` to reproduce that scale.

Computation. The positive term of ``"out"`` and ``"npairs"`` is linear in the similarities, so it
comes from per-class sums of features in O(N * D). Only the log-sum-exp over ``A(i)`` (and over
``P(i)`` for ``"in"``) needs pairwise work. It runs in a custom autograd function
(:mod:`supcon.losses.tiles`), either dense (one N x N tile whose softmax is kept for the backward) or
tiled (``chunk`` anchor rows at a time, the tiles recomputed in the backward, so extra memory is
O(N * (D + chunk))). Both give the same value and gradient. Multi-label weights are pairwise: their
sums come from tiles of ``Y Y^T`` in the same way, recomputed in the backward. Extra keys are
appended as key columns; the backward skips their gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import torch
from torch import nn

from supcon.core import dist as _dist
from supcon.losses.indexing import class_index, count_classes, take_rows
from supcon.losses.inputs import (
    MULTILABEL_RULES,
    VARIANTS,
    check_features,
    check_keys,
    check_labels,
    check_options,
)
from supcon.losses.tiles import Pairs, RowLogSumExp, WeightedPositives, weight_sums

__all__ = ["DENSE_MAX_PAIRS", "MULTILABEL_RULES", "TILE_PAIRS", "VARIANTS", "SupConLoss", "supcon_loss"]


# The dense path keeps one anchors x keys matrix (two for "in") alive until the backward; above this
# many pairs (N = 8192 anchors and keys, 256 MiB in float32) the tiled path is chosen on its own.
DENSE_MAX_PAIRS = 1 << 26
# Automatic tile size of the tiled path: chunk = TILE_PAIRS // N anchor rows, so one tile holds
# about 2**24 float32 logits (64 MiB), whatever N is.
TILE_PAIRS = 1 << 24

_NORM_EPS = 1e-12  # on the squared norm, as tf.math.l2_normalize: zero vectors stay zero


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.square().sum(dim=-1, keepdim=True).clamp_min(_NORM_EPS))


def _class_stats(q, keys, k_cls, n_cls: int, row_offset: int, variant: str):
    """Positive counts and sums of similarities when positives share a class index ``k_cls``.

    Linear in the similarities, the sum over an anchor's class is ``q_i . (sum of the class's keys)``,
    O(N * D) with no pairwise matrix. Both include the self pair (``self_in`` = 1).
    """
    m = q.shape[0]
    q_cls = k_cls[row_offset : row_offset + m]
    count = count_classes(k_cls, n_cls, q.dtype)[q_cls]
    pos_dot = None
    if variant != "in":
        sums = keys.new_zeros(n_cls, keys.shape[1]).index_add_(0, k_cls, keys)
        pos_dot = (q * take_rows(sums, q_cls)).sum(dim=1)
    pairs = Pairs(row_offset, variant != "npairs", q_labels=q_cls, k_labels=k_cls)
    return count, pos_dot, pairs, 1.0


def _mask_stats(q, keys, mask, key_samples, row_offset: int, variant: str):
    """As :func:`_class_stats` for a sample-level mask; ``self_in`` tells where it held the self pair."""
    m, total = q.shape[0], mask.shape[1]
    q_rows = torch.arange(mask.shape[0], device=q.device).repeat(m // max(mask.shape[0], 1))
    per_sample = count_classes(key_samples, total, q.dtype)
    count = _rowwise_matmul(mask, per_sample[:, None])[:, 0][q_rows]
    pos_dot = None
    if variant != "in":
        sums = keys.new_zeros(total, keys.shape[1]).index_add_(0, key_samples, keys)
        pos_dot = (q * take_rows(_rowwise_matmul(mask, sums), q_rows)).sum(dim=1)
    self_in = mask[q_rows, key_samples[row_offset : row_offset + m]].to(q.dtype)
    pairs = Pairs(row_offset, variant != "npairs", mask=mask, q_rows=q_rows, k_cols=key_samples)
    return count, pos_dot, pairs, self_in


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
    keys: torch.Tensor | None = None,
    key_labels: torch.Tensor | None = None,
    multilabel: str | None = None,
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
            ``y``, and ``eye(B)`` the same as ``None``. With ``multilabel`` set: ``[B, C]`` multi-hot
            labels (0/1, float, integer or bool; non-zero entries are the sample's labels).
        temperature: ``tau`` > 0: a number, or a 0-d tensor (which may require grad, e.g. a learned
            temperature; on an accelerator its value is not checked, as that would wait for it).
        variant: ``"out"`` (eq. 2, default), ``"in"`` (eq. 3) or ``"npairs"`` (tfa's npairs_loss).
        normalize: L2-normalise the features (and ``keys``) along ``D`` first
            (``x / max(|x|, 1e-6)``, as ``tf.math.l2_normalize``: a zero vector stays zero, no NaN).
        chunk_size: anchor rows per tile of the memory-linear tiled path; setting it forces that
            path. ``None`` picks dense when ``anchors * keys <= DENSE_MAX_PAIRS`` (2**26, N = 8192),
            else tiles of ``TILE_PAIRS // N`` rows (keys: the batch's rows plus the extra keys).
        gather: all-gather features and labels from every ``torch.distributed`` rank so that each
            local anchor is contrasted with the global batch. A no-op without a process group or
            with one process. See "Across processes" below.
        base_temperature: if given, multiply the loss by ``temperature / base_temperature``, the
            extra factor of the authors' code (which uses 0.07). Off by default: the paper has none.
        keys: ``[M, D]`` extra keys, e.g. a memory queue's (:class:`supcon.losses.queue.LabelQueue`): they
            join every anchor's ``A(i)``, and its ``P(i)`` where their label matches (module
            docstring). Constants: detached, so no gradient reaches them; normalised as the features
            are. They are never anchors and, with ``gather=True``, not gathered: pass the same keys on
            every rank. Not with a ``[B, B]`` mask; with ``labels=None`` every key is a negative.
        key_labels: the keys' labels, as ``labels``: ``[M]`` class ids, or ``[M, C]`` multi-hot with
            ``multilabel``; ``None`` with ``labels=None``.
        multilabel: ``"jaccard"`` or ``"any"``: read ``labels`` as ``[B, C]`` multi-hot and weigh
            positives by label overlap (module docstring). ``None`` (default): single-label.

    Returns:
        A 0-dim tensor. The computation runs in float32, or in float64 for float64 features:
        float16 / bfloat16 features (also from ``torch.autocast``, which is disabled inside) are
        upcast, and the result is float32 for them.

    Raises:
        TypeError: non-tensor or non-floating features or keys, floating-point class ids.
        ValueError: wrong shapes, unknown variant or rule, non-positive temperature or chunk size,
            keys with a mask, keys without their labels.

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
    rank's samples, columns all samples in rank order. Extra ``keys`` are the same on every rank
    and appended once after the gathered rows, so the result is the single-process loss of the
    concatenated batch with those keys.
    """
    features = check_features(features)
    check_options(temperature, variant, chunk_size, base_temperature, multilabel)
    batch, views, dim = features.shape
    device = features.device
    mode, labels = check_labels(labels, batch, device, multilabel)
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
        extra, extra_labels = check_keys(keys, key_labels, mode, labels, dim, device, dtype)
        if extra is not None and normalize:
            extra = _l2_normalize(extra)
        keys, sizes, rank, gather = _gather_rows(z, batch, views, dim, gather)
        n_batch = keys.shape[0]
        if extra is not None:
            keys = torch.cat([keys, extra])
        m, n = z.shape[0], keys.shape[0]
        if chunk_size is None and m * n > DENSE_MAX_PAIRS:
            chunk_size = max(1, TILE_PAIRS // n)
        q = z / temperature
        count, pos_dot, pairs, self_in = _positive_stats(
            mode, q, keys, labels, extra_labels, views, sizes, rank, gather, variant, multilabel, chunk_size
        )
        if extra is not None:
            pairs = dataclasses.replace(pairs, n_grad=n_batch)
        # count and pos_dot include the self pair where self_in is 1; "out" and "in" leave it out,
        # "npairs" always counts it.
        adjust = 1 - self_in if variant == "npairs" else -self_in
        if not isinstance(adjust, float) or adjust != 0:
            count = count + adjust
            if pos_dot is not None:
                pos_dot = pos_dot + adjust * (q * z).sum(dim=1)  # s_ii = q_i . z_i

        lse, lse_pos = RowLogSumExp.apply(q, keys, pairs, variant == "in", chunk_size)

        loss = _mean_over_anchors(lse, lse_pos, count, pos_dot, variant, gather)
        if base_temperature is not None:
            loss = loss * (temperature / base_temperature)
    return loss


def _gather_rows(z: torch.Tensor, batch: int, views: int, dim: int, gather: bool):
    """(The keys: ``z`` of every rank with ``gather``, else ``z``; samples per rank; rank; gather)."""
    if not gather or _dist.world_size() == 1:
        return z, [batch], 0, False
    # One exchange of every rank's [B, V, D], read once on the host: the sizes shape the gather (its
    # padding and trimming), so this is the one wait the gather path needs.
    shapes = _dist.all_gather_shapes([batch, views, dim], z.device)
    if any(s[1:] != shapes[0][1:] for s in shapes):
        raise ValueError(
            "gather=True needs the same number of views and feature size on every rank, got "
            f"[B, V, D] = {shapes}"
        )
    sizes = [s[0] for s in shapes]
    return _dist.all_gather_with_grad(z, [views * s for s in sizes]), sizes, _dist.rank(), True


def _positive_stats(
    mode, q, keys, labels, extra_labels, views, sizes, rank, gather, variant, multilabel, chunk
):
    """``count``, ``pos_dot``, the pairs and ``self_in`` (see :func:`_class_stats`) for the label mode.

    ``keys`` are the batch's rows (every rank's with ``gather``) followed by the extra keys, whose
    labels are ``extra_labels`` (``None`` without extra keys or in SimCLR mode).
    """
    device = q.device
    row_offset = views * sum(sizes[:rank])
    n_extra = keys.shape[0] - views * sum(sizes)
    row_sizes = [views * s for s in sizes]
    if mode in ("labels", "multi"):
        if mode == "multi":  # 0/1 in the compute dtype: weights come from products of them
            labels = labels.to(q.dtype)
            extra_labels = None if extra_labels is None else extra_labels.to(q.dtype)
        k_labels = labels.repeat(views, *([1] * (labels.dim() - 1))) if views > 1 else labels
        if gather:
            k_labels = _dist.all_gather_nograd(k_labels, row_sizes)
        if extra_labels is not None:
            k_labels = torch.cat([k_labels, extra_labels])
        if mode == "multi":
            q_hot = k_labels[row_offset : row_offset + q.shape[0]]
            pairs = Pairs(
                row_offset, variant != "npairs", q_hot=q_hot, k_hot=k_labels, rule=multilabel,
                n_grad=keys.shape[0] - n_extra,
            )  # fmt: skip
            # The weights leave the self pair out: self_in = 0.
            if variant == "in":  # only the weights' sums: the positive term is a log-sum-exp
                return weight_sums(pairs, q.shape[0], chunk), None, pairs, 0.0
            count, pos_dot = WeightedPositives.apply(q, keys, pairs, chunk)
            return count, pos_dot, pairs, 0.0
        # The class of a key: the rank of its label, as torch.unique numbers them; at most n classes.
        return _class_stats(q, keys, class_index(k_labels), keys.shape[0], row_offset, variant)
    # Sample index of every key row in the global order: rank by rank, view-major in a rank.
    key_samples = torch.cat(
        [
            torch.arange(o, o + s, device=device).repeat(views)
            for o, s in zip(itertools.accumulate([0, *sizes[:-1]]), sizes, strict=True)
        ]
    )
    total = sum(sizes)
    if mode == "simclr":  # the classes are the samples; extra keys share one class of no anchor
        if n_extra:
            key_samples = torch.cat([key_samples, key_samples.new_full((n_extra,), total)])
        return _class_stats(q, keys, key_samples, total + (1 if n_extra else 0), row_offset, variant)
    if labels.shape[1] != total:
        raise ValueError(
            f"a positive mask must be [B, B] with B = {total} samples"
            + (f" ([B_local, B_global] = [{sizes[rank]}, {total}] with gather=True)" if gather else "")
            + f", got shape {tuple(labels.shape)}"
        )
    return _mask_stats(q, keys, labels, key_samples, row_offset, variant)


def _mean_over_anchors(lse, lse_pos, count, pos_dot, variant: str, gather: bool) -> torch.Tensor:
    """The mean of the anchors' terms ``l_i``; with ``gather``, over the anchors of every rank."""
    m, dtype, device = lse.shape[0], lse.dtype, lse.device
    if variant == "npairs":  # every anchor is its own target
        local = (lse - pos_dot / count).sum()
        n_valid = float(m)
    else:
        valid = count > 0
        # Multi-label weights may sum to less than 1: only the anchors left out are set to 1.
        safe_count = torch.where(valid, count, 1.0)
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
    """``nn.Module`` form of :func:`supcon_loss`: ``forward(features, labels, keys, key_labels)``.

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
        multilabel: str | None = None,
    ) -> None:
        super().__init__()
        check_options(temperature, variant, chunk_size, base_temperature, multilabel)
        self.temperature = temperature
        self.variant = variant
        self.normalize = normalize
        self.chunk_size = chunk_size
        self.gather = gather
        self.base_temperature = base_temperature
        self.multilabel = multilabel

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        key_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return supcon_loss(
            features,
            labels,
            keys=keys,
            key_labels=key_labels,
            multilabel=self.multilabel,
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
        if self.multilabel is not None:
            parts.append(f"multilabel={self.multilabel!r}")
        return ", ".join(parts)
