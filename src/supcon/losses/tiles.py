"""The pairwise computations behind :func:`supcon.losses.supcon.supcon_loss`, dense or in tiles.

:class:`Pairs` says which keys (columns) each anchor (row) is paired with and which of them are
positives, or with which multi-label weight. :class:`RowLogSumExp` is the row-wise log-sum-exp of
the anchors' similarities over their pairs (and over their positives), with a hand-written
backward: dense, one tile whose softmax is kept, or in tiles of ``chunk`` anchor rows recomputed in
the backward (O(chunk x N) memory). :class:`WeightedPositives` gives the multi-label positive
weights' sums and weighted similarity sums the same way. Extra keys (a memory queue) are columns
after ``Pairs.n_grad`` that take no gradient.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.autograd.function import once_differentiable


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Which keys (columns) each anchor (row) is paired with.

    Anchor ``i`` is key ``self_offset + i``. Positives: equal ``q_labels[i] == k_labels[j]``, or
    ``mask[q_rows[i], k_cols[j]]`` in mask mode; in multi-label mode a weight ``w_ij`` from the
    multi-hot rows ``q_hot[i]`` and ``k_hot[j]`` by ``rule``. Keys from ``n_grad`` on (extra keys)
    are constants: the backward gives them no gradient and skips their share of the work.
    """

    self_offset: int
    exclude_self: bool
    q_labels: torch.Tensor | None = None
    k_labels: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    q_rows: torch.Tensor | None = None
    k_cols: torch.Tensor | None = None
    q_hot: torch.Tensor | None = None
    k_hot: torch.Tensor | None = None
    rule: str | None = None
    n_grad: int | None = None

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

    def positive_logits(self, s: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """``s_ij`` on the positives, -inf elsewhere; ``s_ij + log w_ij`` with weights (a new tensor)."""
        if self.q_hot is None:
            return s.masked_fill(~self.positives(r0, r1), -math.inf)
        return s + self.weights(r0, r1).log_()

    def weights(self, r0: int, r1: int) -> torch.Tensor:
        """Multi-label weights ``w_ij`` of anchors ``r0:r1``: 0 on the self pair and without overlap."""
        inter = self.q_hot[r0:r1] @ self.k_hot.T  # |Y_i & Y_j|: exact, sums of 0/1 products
        if self.rule == "any":
            w = (inter > 0).to(inter.dtype)
        else:  # Jaccard: |Y_i & Y_j| / |Y_i | Y_j|, 0 for two empty label sets
            union = self.q_hot[r0:r1].sum(1, keepdim=True) + self.k_hot.sum(1)[None, :] - inter
            w = inter.div_(union.clamp_min_(1))
        c0 = self.self_offset + r0
        w[:, c0 : c0 + (r1 - r0)].diagonal().fill_(0)
        return w

    def grad_keys(self, k: torch.Tensor) -> int:
        """How many leading keys receive a gradient: all but the constant extra keys."""
        return k.shape[0] if self.n_grad is None else self.n_grad


def logsumexp_(s: torch.Tensor, probs: bool) -> torch.Tensor:
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


class RowLogSumExp(torch.autograd.Function):
    """Row-wise log-sum-exp of ``q @ k.T`` over the paired keys, and over the positives if asked.

    ``chunk=None``: one tile, whose softmax is saved for the backward (fast, N x N memory).
    Otherwise tiles of ``chunk`` anchor rows; only ``q``, ``k`` and the results are saved and the
    backward recomputes each tile (O(chunk x N) memory).
    """

    @staticmethod
    def forward(ctx, q, k, pairs: Pairs, with_pos: bool, chunk: int | None):
        m = q.shape[0]
        lse = lse_pos = q.new_empty(0)
        probs: tuple[torch.Tensor, ...] = ()
        if chunk is None:
            if m > 0:
                s = pairs.logits(q, k, 0, m)
                if with_pos:
                    s_pos = pairs.positive_logits(s, 0, m)
                    lse_pos = logsumexp_(s_pos, probs=True)
                lse = logsumexp_(s, probs=True)
                probs = (s, s_pos) if with_pos else (s,)
        else:
            lse = q.new_empty(m)
            lse_pos = q.new_empty(m if with_pos else 0)
            for r0 in range(0, m, chunk):
                r1 = min(m, r0 + chunk)
                s = pairs.logits(q, k, r0, r1)
                if with_pos:
                    s_pos = pairs.positive_logits(s, r0, r1)
                    lse_pos[r0:r1] = logsumexp_(s_pos, probs=False)
                lse[r0:r1] = logsumexp_(s, probs=False)
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
                return (p @ k).mul_(g), _key_grad(p, q * g, k, pairs), None, None, None
            grad_s = p * g + probs[1] * g_pos
            return grad_s @ k, _key_grad(grad_s, q, k, pairs), None, None, None
        dq = torch.empty_like(q)
        dk = torch.zeros_like(k)
        ng = pairs.grad_keys(k)
        lse = _finite_or_zero(lse)[:, None]
        lse_pos = _finite_or_zero(lse_pos)[:, None] if g_pos is not None else None
        for r0 in range(0, q.shape[0], chunk):
            r1 = min(q.shape[0], r0 + chunk)
            s = pairs.logits(q, k, r0, r1)
            if g_pos is not None:
                p_pos = pairs.positive_logits(s, r0, r1).sub_(lse_pos[r0:r1]).exp_()
            p = s.sub_(lse[r0:r1]).exp_()
            if g_pos is None:
                torch.mm(p, k, out=dq[r0:r1]).mul_(g[r0:r1])
                dk[:ng].addmm_(p[:, :ng].T, q[r0:r1] * g[r0:r1])
            else:
                p.mul_(g[r0:r1]).add_(p_pos.mul_(g_pos[r0:r1]))
                torch.mm(p, k, out=dq[r0:r1])
                dk[:ng].addmm_(p[:, :ng].T, q[r0:r1])
        return dq, dk, None, None, None


def _key_grad(grad_s: torch.Tensor, rhs: torch.Tensor, k: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    """``grad_s.T @ rhs``, the keys' gradient, computed only for the keys that take one."""
    ng = pairs.grad_keys(k)
    if ng == k.shape[0]:
        return grad_s.T @ rhs
    dk = torch.zeros_like(k)
    torch.mm(grad_s[:, :ng].T, rhs, out=dk[:ng])
    return dk


def weight_sums(pairs: Pairs, m: int, chunk: int | None) -> torch.Tensor:
    """``sum_j w_ij`` of every anchor, a tile of ``chunk`` anchor rows at a time."""
    if m == 0:
        return pairs.k_hot.new_zeros(0)
    step = chunk or m
    return torch.cat([pairs.weights(r0, min(m, r0 + step)).sum(dim=1) for r0 in range(0, m, step)])


class WeightedPositives(torch.autograd.Function):
    """Multi-label positives: per anchor ``sum_j w_ij`` and ``sum_j w_ij s_ij = q_i . sum_j w_ij k_j``.

    Tiles of ``chunk`` anchor rows (one tile for ``None``); the weights are recomputed in the
    backward, so only ``q``, ``k`` and the ``[N, D]`` weighted key sums are kept.
    """

    @staticmethod
    def forward(ctx, q, k, pairs: Pairs, chunk: int | None):
        m = q.shape[0]
        step = chunk or max(m, 1)
        count, wk = q.new_empty(m), q.new_empty(m, k.shape[1])
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            w = pairs.weights(r0, r1)
            count[r0:r1] = w.sum(dim=1)
            torch.mm(w, k, out=wk[r0:r1])
        ctx.pairs, ctx.step = pairs, step
        ctx.save_for_backward(q, k, wk)
        ctx.mark_non_differentiable(count)
        ctx.set_materialize_grads(False)
        return count, (q * wk).sum(dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, _g_count, g):
        if g is None:
            return None, None, None, None
        q, k, wk = ctx.saved_tensors
        qg = q * g[:, None]
        dk = torch.zeros_like(k)
        ng = ctx.pairs.grad_keys(k)
        for r0 in range(0, q.shape[0], ctx.step):
            r1 = min(q.shape[0], r0 + ctx.step)
            dk[:ng].addmm_(ctx.pairs.weights(r0, r1)[:, :ng].T, qg[r0:r1])
        return wk * g[:, None], dk, None, None
