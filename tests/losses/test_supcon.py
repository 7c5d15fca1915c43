"""The SupCon loss against a loop reference written from the paper's equations (arXiv:2004.11362)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import supcon.losses.supcon as loss_mod
from supcon.losses import indexing
from supcon.losses.supcon import SupConLoss, supcon_loss

VARIANTS = ("out", "in", "npairs")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def reference_loss(
    features,
    labels=None,
    temperature=0.1,
    variant="out",
    normalize=True,
    keys=None,
    key_labels=None,
    multilabel=None,
):
    """Eq. 2 (L_out), eq. 3 (L_in) and tfa's npairs loss, one anchor at a time, in float64.

    ``labels`` is None (SimCLR: positives are the same sample's other views), ``[B]`` class ids or a
    ``[B, B]`` sample-level positive mask; with ``multilabel`` ("jaccard" or "any") ``[B, C]`` multi-hot
    rows, and each positive ``p`` is weighted by ``w_ip``. ``keys`` ``[M, D]`` with ``key_labels`` join
    every anchor's denominator and, where their label matches, its positives. Anchors without a
    positive are left out of the mean.
    """
    f = features.double()
    if f.dim() == 2:
        f = f.unsqueeze(1)
    batch, views, _ = f.shape
    rows = [f[b, v] for v in range(views) for b in range(batch)]
    sample = [b for v in range(views) for b in range(batch)]
    extra = [] if keys is None else list(keys.double())
    if normalize:
        rows = [r / torch.clamp(r.norm(), min=1e-6) for r in rows]
        extra = [r / torch.clamp(r.norm(), min=1e-6) for r in extra]
    z = torch.stack(rows)
    n = len(rows)
    columns = torch.stack(rows + extra) if extra else z
    s = z @ columns.T / temperature  # s[i, j] = z_i . c_j / tau, columns: rows then keys

    def overlap(a, b):
        inter, union = float((a.bool() & b.bool()).sum()), float((a.bool() | b.bool()).sum())
        if multilabel == "any":
            return float(inter > 0)
        return inter / union if union else 0.0

    def weight(i, j):  # w_ij of anchor i and column j (0: not a positive)
        if j >= n:  # a key
            if labels is None:
                return 0.0
            if multilabel:
                return overlap(labels[sample[i]], key_labels[j - n])
            return float(labels[sample[i]] == key_labels[j - n])
        if multilabel:
            return overlap(labels[sample[i]], labels[sample[j]])
        if labels is None:
            return float(sample[i] == sample[j])
        if labels.dim() == 2:
            return float(bool(labels[sample[i], sample[j]]))
        return float(labels[sample[i]] == labels[sample[j]])

    terms = []
    for i in range(n):
        others = [a for a in range(columns.shape[0]) if a != i]  # A(i)
        positives = [(p, weight(i, p)) for p in others if weight(i, p) > 0]  # P(i) with weights
        if variant == "npairs":
            # softmax cross-entropy over all columns (self included), targets on {i} + P(i) by weight
            targets = [(i, 1.0), *positives]
            log_denominator = torch.logsumexp(s[i], dim=0)
            total = sum(w for _, w in targets)
            terms.append(-sum(w * (s[i, j] - log_denominator) for j, w in targets) / total)
            continue
        if not positives:
            continue
        log_denominator = torch.logsumexp(s[i, others], dim=0)
        total = sum(w for _, w in positives)
        if variant == "out":
            # -1/W sum_p w_p log(exp(s_ip) / sum_a exp(s_ia))
            terms.append(-sum(w * (s[i, p] - log_denominator) for p, w in positives) / total)
        else:
            # -log(1/W sum_p w_p exp(s_ip) / sum_a exp(s_ia)), the sum of exps as a log-sum-exp
            log_ratios = torch.stack([s[i, p] - log_denominator + math.log(w) for p, w in positives])
            terms.append(-(torch.logsumexp(log_ratios, dim=0) - math.log(total)))
    if not terms:
        return (z * 0).sum()
    return sum(terms) / len(terms)


def tfa_npairs_loss(features, labels, temperature):
    """The seed's loss: tf.math.l2_normalize, logits = z z^T / tau, tfa.losses.npairs_loss."""
    z = features * torch.rsqrt(torch.clamp((features * features).sum(1, keepdim=True), min=1e-12))
    logits = z @ z.T / temperature
    y = labels[:, None].to(logits.dtype)
    y_true = (y == y.T).to(logits.dtype)
    y_true = y_true / y_true.sum(1, keepdim=True)
    # tf.nn.softmax_cross_entropy_with_logits(labels=y_true, logits=logits), then reduce_mean
    return (-(y_true * F.log_softmax(logits, dim=1)).sum(1)).mean()


def authors_supcon(features, labels, temperature, base_temperature=0.07):
    """The authors' SupContrast SupConLoss (contrast_mode='all') on [B, V, D] normalised features."""
    batch = features.shape[0]
    mask = (labels[:, None] == labels[None, :]).float()
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_dot_contrast = contrast_feature @ contrast_feature.T / temperature
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(contrast_count, contrast_count)
    logits_mask = 1 - torch.eye(batch * contrast_count)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def make_labels(pattern: str, batch: int, gen: torch.Generator):
    if pattern == "random":
        return torch.randint(0, 3, (batch,), generator=gen)
    if pattern == "equal":
        return torch.full((batch,), 7)
    if pattern == "distinct":
        return torch.randperm(batch, generator=gen) * 5 - 3
    if pattern == "simclr":
        return None
    if pattern == "mask":  # an asymmetric relation with a mostly-true diagonal
        mask = torch.rand(batch, batch, generator=gen) < 0.4
        mask.fill_diagonal_(True)
        if batch > 1:
            mask[0, 0] = False
        return mask
    raise AssertionError(pattern)


def value_and_grad(fn, features):
    x = features.detach().clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad(out, x, allow_unused=True)
    return out.detach(), torch.zeros_like(x) if grad is None else grad


def assert_close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol)


SHAPES = [(1, 1), (1, 2), (5, 1), (6, 2), (4, 4), (12, 2)]
PATTERNS = ["random", "equal", "distinct", "simclr", "mask"]


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(("batch", "views"), SHAPES)
def test_matches_reference_float64(variant, pattern, batch, views):
    idx = SHAPES.index((batch, views)) + 7 * PATTERNS.index(pattern) + 31 * VARIANTS.index(variant)
    gen = torch.Generator().manual_seed(idx)
    dim = (3, 16, 5)[idx % 3]
    temperature = (0.05, 0.1, 0.7)[idx % 3]
    features = torch.randn(batch, views, dim, generator=gen, dtype=torch.float64)
    labels = make_labels(pattern, batch, gen)

    want, want_grad = value_and_grad(lambda x: reference_loss(x, labels, temperature, variant), features)
    for chunk in (None, 1, 5):
        got, got_grad = value_and_grad(
            lambda x, c=chunk: supcon_loss(x, labels, temperature=temperature, variant=variant, chunk_size=c),
            features,
        )
        assert got.dtype == torch.float64
        assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pattern", ["random", "simclr", "mask"])
def test_matches_reference_float32(variant, pattern):
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(24, 2, 32, generator=gen)
    labels = make_labels(pattern, 24, gen)
    want, want_grad = value_and_grad(lambda x: reference_loss(x, labels, 0.1, variant), features.double())
    for chunk in (None, 7):
        got, got_grad = value_and_grad(
            lambda x, c=chunk: supcon_loss(x, labels, temperature=0.1, variant=variant, chunk_size=c),
            features,
        )
        assert got.dtype == torch.float32
        assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pattern", ["random", "simclr", "mask"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_gradcheck(variant, pattern, chunk):
    gen = torch.Generator().manual_seed(11)
    features = torch.randn(5, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = make_labels(pattern, 5, gen)
    assert torch.autograd.gradcheck(
        lambda x: supcon_loss(x, labels, temperature=0.3, variant=variant, chunk_size=chunk), (features,)
    )


def test_npairs_equals_tfa_formula():
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(64, 24, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (64,), generator=gen)
    want = tfa_npairs_loss(features, labels, 0.05)
    got = supcon_loss(features, labels, temperature=0.05, variant="npairs")
    assert_close(got, want, rtol=1e-12, atol=1e-12)
    # in float32 too, as the seed runs it
    got32 = supcon_loss(features.float(), labels, temperature=0.05, variant="npairs")
    assert_close(got32, want, rtol=1e-5, atol=1e-6)
    # several views are flattened with their labels repeated
    feats3 = torch.randn(16, 3, 8, generator=gen, dtype=torch.float64)
    labels3 = torch.randint(0, 4, (16,), generator=gen)
    flat = torch.cat(torch.unbind(feats3, dim=1))
    want3 = tfa_npairs_loss(flat, labels3.repeat(3), 0.1)
    assert_close(supcon_loss(feats3, labels3, variant="npairs"), want3, rtol=1e-12, atol=1e-12)


def test_matches_authors_code_with_base_temperature():
    gen = torch.Generator().manual_seed(6)
    features = F.normalize(torch.randn(32, 2, 16, generator=gen), dim=-1)
    labels = torch.randint(0, 4, (32,), generator=gen)
    want = authors_supcon(features, labels, temperature=0.1)
    got = supcon_loss(features, labels, temperature=0.1, base_temperature=0.07)
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    plain = supcon_loss(features, labels, temperature=0.1)
    assert_close(got, plain * (0.1 / 0.07), rtol=1e-6, atol=0)


def test_simclr_mode_equals_identity_mask_and_distinct_labels():
    gen = torch.Generator().manual_seed(8)
    features = torch.randn(10, 2, 8, generator=gen)
    for variant in VARIANTS:
        a = supcon_loss(features, None, variant=variant)
        b = supcon_loss(features, torch.eye(10, dtype=torch.bool), variant=variant)
        c = supcon_loss(features, torch.arange(10), variant=variant)
        assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert_close(a, c, rtol=1e-6, atol=1e-6)


def test_mask_from_labels_equals_labels():
    gen = torch.Generator().manual_seed(9)
    features = torch.randn(20, 2, 8, generator=gen)
    labels = torch.randint(0, 4, (20,), generator=gen)
    mask = (labels[:, None] == labels[None, :]).float()  # numeric masks count non-zero entries
    for variant in VARIANTS:
        assert_close(
            supcon_loss(features, mask, variant=variant),
            supcon_loss(features, labels, variant=variant),
            rtol=1e-6,
            atol=1e-6,
        )


def test_labels_are_compared_not_used_as_indices():
    gen = torch.Generator().manual_seed(10)
    features = torch.randn(9, 2, 8, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3])
    relabelled = torch.tensor([-5, -5, 10**12, 10**12, 7, 7, 2, 2, 2])
    for variant in VARIANTS:
        assert_close(
            supcon_loss(features, relabelled, variant=variant),
            supcon_loss(features, labels, variant=variant),
            rtol=0,
            atol=0,
        )


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["out", "in"])
def test_anchors_without_positives_are_left_out(variant):
    gen = torch.Generator().manual_seed(12)
    features = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2])  # only the first two anchors have a positive
    z = F.normalize(features, dim=1)
    s = z @ z.T / 0.1
    # both anchors have exactly one positive, so L_out and L_in agree
    terms = [torch.logsumexp(s[i, [a for a in range(4) if a != i]], 0) - s[i, 1 - i] for i in (0, 1)]
    want = sum(terms) / 2
    assert_close(supcon_loss(features, labels, variant=variant), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["out", "in"])
@pytest.mark.parametrize(
    ("shape", "labels"),
    [((6, 8), torch.arange(6)), ((6, 8), None), ((1, 8), torch.tensor([3])), ((1, 1, 8), None)],
)
@pytest.mark.parametrize("chunk", [None, 2])
def test_no_positive_at_all_gives_zero_with_graph(variant, shape, labels, chunk):
    features = torch.randn(*shape, requires_grad=True)
    loss = supcon_loss(features, labels, variant=variant, chunk_size=chunk)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_sample(variant):
    features = torch.randn(1, 2, 8, dtype=torch.float64)
    want, want_grad = value_and_grad(lambda x: reference_loss(x, None, 0.1, variant), features)
    got, got_grad = value_and_grad(lambda x: supcon_loss(x, variant=variant), features)
    assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    # one sample, one view: only npairs has a term (the anchor is its own target), equal to 0
    one = supcon_loss(torch.randn(1, 8), torch.tensor([1]), variant=variant)
    assert one.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [None, 4])
def test_huge_unnormalised_features_low_temperature(variant, dtype, chunk):
    # |x| = 1e4, tau = 0.01: similarities reach 1e10, exp overflows and underflows everywhere
    gen = torch.Generator().manual_seed(13)
    features = F.normalize(torch.randn(8, 2, 16, generator=gen, dtype=torch.float64), dim=-1) * 1e4
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])
    want, want_grad = value_and_grad(
        lambda x: reference_loss(x, labels, 0.01, variant, normalize=False), features
    )
    got, got_grad = value_and_grad(
        lambda x: supcon_loss(
            x, labels, temperature=0.01, variant=variant, normalize=False, chunk_size=chunk
        ),
        features.to(dtype),
    )
    assert torch.isfinite(got) and torch.isfinite(got_grad).all()
    assert want.abs() > 1e8  # the case is as extreme as intended
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(got, want, rtol=tol, atol=0)
    # gradients: most entries are exact zeros or O(1e6); compare relative to the largest entry
    scale = want_grad.abs().max()
    assert_close(got_grad / scale, want_grad / scale, rtol=0, atol=tol * 10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk", [None, 3])
def test_zero_vectors(variant, chunk):
    gen = torch.Generator().manual_seed(14)
    features = torch.randn(6, 2, 8, generator=gen, dtype=torch.float64)
    features[1, 0] = 0
    features[4] = 0
    labels = torch.tensor([0, 0, 1, 1, 0, 2])
    want, want_grad = value_and_grad(lambda x: reference_loss(x, labels, 0.1, variant), features)
    got, got_grad = value_and_grad(
        lambda x: supcon_loss(x, labels, variant=variant, chunk_size=chunk), features
    )
    assert torch.isfinite(got) and torch.isfinite(got_grad).all()
    assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-8)
    # float32 too
    got32, grad32 = value_and_grad(lambda x: supcon_loss(x, labels, variant=variant), features.float())
    assert torch.isfinite(got32) and torch.isfinite(grad32).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(variant, dtype):
    gen = torch.Generator().manual_seed(15)
    features = torch.randn(16, 2, 32, generator=gen).to(dtype)
    labels = torch.randint(0, 3, (16,), generator=gen)
    got, got_grad = value_and_grad(
        lambda x: supcon_loss(x, labels, variant=variant, temperature=0.05), features
    )
    assert got.dtype == torch.float32
    assert got_grad.dtype == dtype and torch.isfinite(got_grad.float()).all()
    # identical to the float32 computation on the same (exactly representable) values
    want, want_grad = value_and_grad(
        lambda x: supcon_loss(x, labels, variant=variant, temperature=0.05), features.float()
    )
    assert_close(got, want, rtol=0, atol=0)
    assert_close(got_grad.float(), want_grad.to(dtype).float(), rtol=0, atol=0)
    ref = reference_loss(features.double(), labels, 0.05, variant)
    assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_autocast_bfloat16_runs_in_float32():
    gen = torch.Generator().manual_seed(16)
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(12, 2, 32, generator=gen)
    labels = torch.randint(0, 3, (12,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = lin(x)
        assert feats.dtype == torch.bfloat16
        loss = supcon_loss(feats, labels)
    assert loss.dtype == torch.float32
    want = supcon_loss(feats.detach().float(), labels)
    assert_close(loss, want, rtol=0, atol=0)
    loss.backward()
    assert torch.isfinite(lin.weight.grad).all()


# ---------------------------------------------------------------------------------------------
# The tiled path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pattern", ["random", "simclr", "mask", "distinct"])
def test_tiled_equals_dense_float32(variant, pattern):
    gen = torch.Generator().manual_seed(17)
    features = torch.randn(300, 2, 64, generator=gen)
    labels = make_labels(pattern, 300, gen)
    want, want_grad = value_and_grad(lambda x: supcon_loss(x, labels, variant=variant), features)
    for chunk in (97, 250, 600, 10_000):  # uneven last tile, two tiles, one tile, oversized
        got, got_grad = value_and_grad(
            lambda x, c=chunk: supcon_loss(x, labels, variant=variant, chunk_size=c), features
        )
        assert_close(got, want, rtol=1e-5, atol=0)
        # float32 gradients are differences of O(1/tau) terms: compare them as vectors
        assert (got_grad - want_grad).norm() <= 1e-5 * want_grad.norm()


def _saved_bytes(fn):
    """Bytes of all tensors autograd keeps for the backward of ``fn()``."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiled_path_keeps_linear_memory_for_backward(variant):
    n, dim = 2048, 16
    features = torch.randn(n, dim, requires_grad=True)
    labels = torch.randint(0, 10, (n,))
    _, dense = _saved_bytes(lambda: supcon_loss(features, labels, variant=variant))
    out, tiled = _saved_bytes(lambda: supcon_loss(features, labels, variant=variant, chunk_size=128))
    assert dense >= n * n * 4  # the dense path keeps the softmax
    assert tiled < 64 * n * (dim + 8)  # a few [N, D] and [N] tensors, no [N, N] one
    out.backward()
    assert torch.isfinite(features.grad).all()


def test_tiled_path_is_chosen_for_large_batches(monkeypatch):
    chunks = []
    apply = loss_mod.RowLogSumExp.apply

    def spy(q, k, pairs, with_pos, chunk):
        chunks.append(chunk)
        return apply(q, k, pairs, with_pos, chunk)

    monkeypatch.setattr(loss_mod.RowLogSumExp, "apply", spy)
    features = torch.randn(100, 2, 8)
    supcon_loss(features, None)
    monkeypatch.setattr(loss_mod, "DENSE_MAX_PAIRS", 200 * 200 - 1)
    monkeypatch.setattr(loss_mod, "TILE_PAIRS", 200 * 30)
    supcon_loss(features, None)
    supcon_loss(features, None, chunk_size=17)
    assert chunks == [None, 30, 17]


# ---------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["out", "npairs"])
@pytest.mark.parametrize("labels", ["classes", "mask", "simclr"])
def test_repeated_backward_is_bit_identical(variant, labels):
    # Reproducible runs need a deterministic gradient: on the CPU, the backward of advanced indexing
    # accumulates from several threads in no fixed order (this failed 29 of 30 times with 2 threads).
    torch.manual_seed(0)
    f0 = torch.randn(256, 2, 128)
    y = torch.randint(0, 10, (256,))
    lab = {"classes": y, "mask": y[:, None] == y[None, :], "simclr": None}[labels]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(6):
            f = f0.clone().requires_grad_()
            supcon_loss(f, lab, temperature=0.05, variant=variant).backward()
            grads.append(f.grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_module_wrapper_matches_function():
    gen = torch.Generator().manual_seed(18)
    features = torch.randn(10, 2, 8, generator=gen)
    labels = torch.randint(0, 3, (10,), generator=gen)
    criterion = SupConLoss(temperature=0.2, variant="in", chunk_size=4)
    assert "temperature=0.2" in repr(criterion) and "'in'" in repr(criterion)
    assert_close(
        criterion(features, labels), supcon_loss(features, labels, temperature=0.2, variant="in"), 1e-6, 0
    )
    assert list(criterion.parameters()) == []


def test_gather_without_process_group_is_a_no_op():
    gen = torch.Generator().manual_seed(19)
    features = torch.randn(10, 2, 8, generator=gen)
    labels = torch.randint(0, 3, (10,), generator=gen)
    assert_close(supcon_loss(features, labels, gather=True), supcon_loss(features, labels), 0, 0)


def test_labels_on_another_dtype_and_shape_forms():
    features = torch.randn(6, 2, 8)
    a = supcon_loss(features, torch.tensor([0, 1, 0, 1, 1, 0], dtype=torch.int32))
    b = supcon_loss(features, torch.tensor([0, 1, 0, 1, 1, 0]))
    c = supcon_loss(features, torch.tensor([False, True, False, True, True, False]))
    assert_close(a, b, 0, 0)
    assert_close(a, c, 0, 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"features": torch.randn(8)}, ValueError, r"\[B, V, D\].*\[N, D\].*\(8,\)"),
        ({"features": torch.randn(2, 2, 2, 2)}, ValueError, r"got shape \(2, 2, 2, 2\)"),
        ({"features": torch.ones(4, 2, dtype=torch.long)}, TypeError, "floating-point"),
        ({"features": [[1.0, 2.0]]}, TypeError, "torch.Tensor"),
        ({"labels": torch.arange(5)}, ValueError, "5 entries but features hold 4 samples"),
        ({"labels": torch.ones(4, 3)}, ValueError, r"\[B, B\] with B = 4.*\(4, 3\)"),
        ({"labels": torch.ones(3, 4)}, ValueError, r"\[B, B\] with B = 4.*\(3, 4\)"),
        ({"labels": torch.ones(4, 1)}, ValueError, r"\[B, B\].*\(4, 1\)"),
        ({"labels": torch.ones(4, 4, 4)}, ValueError, r"\[B\] class ids or a \[B, B\]"),
        ({"labels": torch.ones(4)}, TypeError, "integer class ids.*labels.long"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0, got 0.0"),
        ({"temperature": -1}, ValueError, "temperature must be"),
        ({"temperature": float("nan")}, ValueError, "temperature must be"),
        (
            {"temperature": torch.tensor(-0.5)},
            ValueError,
            "temperature must be a finite number > 0, got -0.5",
        ),
        ({"temperature": torch.tensor([0.1])}, ValueError, "0-d real tensor"),
        ({"temperature": torch.tensor(True)}, ValueError, "0-d real tensor"),
        ({"variant": "mean"}, ValueError, "unknown variant 'mean'; valid variants: 'out', 'in', 'npairs'"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be None or an integer >= 1"),
        ({"base_temperature": 0}, ValueError, "base_temperature must be"),
    ],
)
def test_errors(kwargs, error, match):
    args = {"features": torch.randn(4, 2, 8), "labels": torch.tensor([0, 1, 0, 1])}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        supcon_loss(args.pop("features"), args.pop("labels"), **args)


def test_module_validates_options_early():
    with pytest.raises(ValueError, match="valid variants"):
        SupConLoss(variant="sum")
    with pytest.raises(ValueError, match="temperature"):
        SupConLoss(temperature=0)


@pytest.mark.parametrize("variant", ["out", "in", "npairs"])
def test_temperature_as_a_tensor(variant):
    gen = torch.Generator().manual_seed(23)
    features = torch.randn(12, 2, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (12,), generator=gen)
    want = supcon_loss(features, labels, temperature=0.07, variant=variant, base_temperature=0.07)
    tau = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    got = supcon_loss(features, labels, temperature=tau, variant=variant, base_temperature=0.07)
    assert_close(got, want, 0, 0)
    # a learned temperature receives its gradient
    got.backward()
    eps = 1e-6
    fd = (
        supcon_loss(features, labels, temperature=0.07 + eps, variant=variant, base_temperature=0.07)
        - supcon_loss(features, labels, temperature=0.07 - eps, variant=variant, base_temperature=0.07)
    ) / (2 * eps)
    assert_close(tau.grad, fd, 1e-6, 1e-8)
    module = SupConLoss(temperature=torch.tensor(0.07), variant=variant, base_temperature=0.07)
    assert_close(module(features.float(), labels), want.float(), 1e-6, 1e-6)


def test_class_index_and_counts_match_unique_and_bincount():
    gen = torch.Generator().manual_seed(29)
    for labels in (
        torch.randint(-5, 5, (40,), generator=gen),
        torch.randint(0, 10**9, (33,), generator=gen),
        torch.tensor([7]),
        torch.zeros(0, dtype=torch.long),
        torch.tensor([3, 3, 3, 3]),
    ):
        _, inverse = torch.unique(labels, return_inverse=True)
        assert torch.equal(indexing.class_index(labels), inverse)
        n = labels.numel()
        counts = indexing.count_classes(inverse, n, torch.float32)
        assert torch.equal(counts, torch.bincount(inverse, minlength=n).float())


# ---------------------------------------------------------------------------------------------
# Extra keys (a memory queue) and multi-label positives
# ---------------------------------------------------------------------------------------------

KEY_MODES = ["labels", "simclr", "jaccard", "any"]


def make_key_case(mode: str, views: int, gen: torch.Generator, n_keys: int = 5):
    """(features [6, V, 5], labels, keys [M, 5], key_labels, multilabel) of a small case with keys.

    Class ids: class 1 has one sample (with one view, positives only among the keys), classes 2 and 3
    have samples but no key, class 4 only keys, so anchors with positives in the batch alone, in the
    keys alone, in both, and in neither all occur. Multi-hot: the same, plus a sample and a key with
    no label at all.
    """
    features = torch.randn(6, views, 5, generator=gen, dtype=torch.float64)
    keys = F.normalize(torch.randn(n_keys, 5, generator=gen, dtype=torch.float64), dim=1)
    if mode == "simclr":
        return features, None, keys, None, None
    labels = torch.tensor([0, 0, 1, 2, 3, 3])
    key_labels = torch.tensor([1, 4, 4, 0, 1])[:n_keys]
    if mode == "labels":
        return features, labels, keys, key_labels, None
    hot = F.one_hot(labels, 5).bool()
    hot[0, 2] = hot[3, 0] = hot[4, 4] = True  # overlaps of different sizes
    hot[5] = False  # no label at all
    key_hot = F.one_hot(key_labels, 5).bool()
    key_hot[1, 3] = key_hot[3, 2] = True
    key_hot[2] = False
    return features, hot.float(), keys, key_hot, mode


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", KEY_MODES)
@pytest.mark.parametrize("views", [1, 2])
def test_keys_match_reference_float64(variant, mode, views):
    gen = torch.Generator().manual_seed(40 + KEY_MODES.index(mode) + 7 * views)
    features, labels, keys, key_labels, multilabel = make_key_case(mode, views, gen)
    kw = {"keys": keys, "key_labels": key_labels, "multilabel": multilabel}
    want, want_grad = value_and_grad(lambda x: reference_loss(x, labels, 0.2, variant, **kw), features)
    # the keys change the loss: not a vacuous comparison (one view without labels has no positive)
    without = reference_loss(features, labels, 0.2, variant, multilabel=multilabel)
    assert (want - without).abs() > 1e-3 or (mode == "simclr" and views == 1 and variant != "npairs")
    for chunk in (None, 1, 4):
        got, got_grad = value_and_grad(
            lambda x, c=chunk: supcon_loss(x, labels, temperature=0.2, variant=variant, chunk_size=c, **kw),
            features,
        )
        assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rule", ["jaccard", "any"])
@pytest.mark.parametrize(("batch", "views"), [(1, 2), (5, 1), (6, 2), (4, 3)])
def test_multilabel_matches_reference_float64(variant, rule, batch, views):
    gen = torch.Generator().manual_seed(60 + batch + 5 * views)
    features = torch.randn(batch, views, 6, generator=gen, dtype=torch.float64)
    hot = torch.rand(batch, 4, generator=gen) < 0.4
    hot[0] = False  # an image without labels
    want, want_grad = value_and_grad(
        lambda x: reference_loss(x, hot, 0.3, variant, multilabel=rule), features
    )
    for labels in (hot, hot.float(), hot.long()):
        for chunk in (None, 1, 3):
            got, got_grad = value_and_grad(
                lambda x, c=chunk, y=labels: supcon_loss(
                    x, y, temperature=0.3, variant=variant, chunk_size=c, multilabel=rule
                ),
                features,
            )
            assert_close(got, want, rtol=1e-10, atol=1e-10)
            assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", KEY_MODES)
@pytest.mark.parametrize("chunk", [None, 4])
def test_gradcheck_with_keys(variant, mode, chunk):
    gen = torch.Generator().manual_seed(71)
    features, labels, keys, key_labels, multilabel = make_key_case(mode, 2, gen)
    assert torch.autograd.gradcheck(
        lambda x: supcon_loss(
            x,
            labels,
            temperature=0.3,
            variant=variant,
            chunk_size=chunk,
            keys=keys,
            key_labels=key_labels,
            multilabel=multilabel,
        ),
        (features.requires_grad_(True),),
    )


def test_one_hot_multilabel_equals_class_ids():
    gen = torch.Generator().manual_seed(72)
    features = torch.randn(12, 2, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (12,), generator=gen)
    keys = F.normalize(torch.randn(7, 8, generator=gen, dtype=torch.float64), dim=1)
    key_labels = torch.randint(0, 5, (7,), generator=gen)
    for variant in VARIANTS:
        want = supcon_loss(features, labels, variant=variant, keys=keys, key_labels=key_labels)
        for rule in ("jaccard", "any"):
            got = supcon_loss(
                features,
                F.one_hot(labels, 5),
                variant=variant,
                keys=keys,
                key_labels=F.one_hot(key_labels, 5),
                multilabel=rule,
            )
            assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", KEY_MODES)
def test_keys_take_no_gradient_and_are_copied(mode):
    gen = torch.Generator().manual_seed(73)
    features, labels, keys, key_labels, multilabel = make_key_case(mode, 2, gen)
    keys = keys.clone().requires_grad_(True)
    f = features.clone().requires_grad_(True)
    kw = {"key_labels": key_labels, "multilabel": multilabel}
    loss = supcon_loss(f, labels, keys=keys, **kw)
    want = torch.autograd.grad(supcon_loss(features.requires_grad_(True), labels, keys=keys.detach(), **kw),
                               features)[0]  # fmt: skip
    with torch.no_grad():
        keys.mul_(-1)  # a queue overwritten between the forward and the backward
    loss.backward()
    assert keys.grad is None
    assert_close(f.grad, want, rtol=0, atol=0)


def test_empty_keys_equal_no_keys():
    gen = torch.Generator().manual_seed(74)
    features = torch.randn(10, 2, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (10,), generator=gen)
    hot = torch.rand(10, 3, generator=gen) < 0.5
    cases = [(labels, labels[:0], None), (hot, hot[:0], "jaccard"), (None, None, None)]
    for variant, chunk, (y, ky, rule) in itertools.product(VARIANTS, (None, 3), cases):
        kw = {"variant": variant, "chunk_size": chunk, "multilabel": rule}
        want, want_grad = value_and_grad(lambda x, y=y, kw=kw: supcon_loss(x, y, **kw), features)
        got, got_grad = value_and_grad(
            lambda x, y=y, ky=ky, kw=kw: supcon_loss(x, y, keys=features[:0, 0], key_labels=ky, **kw),
            features,
        )
        assert_close(got, want, rtol=1e-14, atol=1e-14)
        assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["labels", "jaccard"])
def test_tiled_equals_dense_with_keys_float32(variant, mode):
    gen = torch.Generator().manual_seed(75)
    features = torch.randn(120, 2, 32, generator=gen)
    keys = F.normalize(torch.randn(200, 32, generator=gen), dim=1)
    if mode == "labels":
        labels, key_labels, rule = torch.randint(0, 20, (120,), generator=gen), None, None
        key_labels = torch.randint(0, 25, (200,), generator=gen)
    else:
        labels = torch.rand(120, 6, generator=gen) < 0.3
        key_labels, rule = torch.rand(200, 6, generator=gen) < 0.3, mode
    kw = {"keys": keys, "key_labels": key_labels, "multilabel": rule, "variant": variant}
    want, want_grad = value_and_grad(lambda x: supcon_loss(x, labels, **kw), features)
    for chunk in (37, 240):
        got, got_grad = value_and_grad(
            lambda x, c=chunk: supcon_loss(x, labels, chunk_size=c, **kw), features
        )
        assert_close(got, want, rtol=1e-5, atol=0)
        assert (got_grad - want_grad).norm() <= 1e-5 * want_grad.norm()


@pytest.mark.parametrize("mode", ["labels", "jaccard"])
def test_tiled_path_keeps_linear_memory_with_keys_and_weights(mode):
    n, dim, n_keys = 1024, 16, 1024
    features = torch.randn(n, dim, requires_grad=True)
    keys = F.normalize(torch.randn(n_keys, dim), dim=1)
    if mode == "labels":
        labels, key_labels, rule = torch.randint(0, 10, (n,)), torch.randint(0, 10, (n_keys,)), None
    else:
        labels, key_labels, rule = torch.rand(n, 5) < 0.3, torch.rand(n_keys, 5) < 0.3, mode
    kw = {"keys": keys, "key_labels": key_labels, "multilabel": rule}
    out, tiled = _saved_bytes(lambda: supcon_loss(features, labels, chunk_size=128, **kw))
    assert tiled < 64 * (n + n_keys) * (dim + 8)  # no [N, N + M] tensor is kept
    out.backward()
    assert torch.isfinite(features.grad).all()


def test_module_wrapper_passes_keys_and_multilabel():
    gen = torch.Generator().manual_seed(76)
    features, labels, keys, key_labels, _ = make_key_case("jaccard", 2, gen)
    criterion = SupConLoss(temperature=0.2, variant="in", multilabel="jaccard")
    assert "multilabel='jaccard'" in repr(criterion)
    want = supcon_loss(
        features,
        labels,
        temperature=0.2,
        variant="in",
        keys=keys,
        key_labels=key_labels,
        multilabel="jaccard",
    )
    assert_close(criterion(features, labels, keys, key_labels), want, 0, 0)
    with pytest.raises(ValueError, match="unknown multilabel rule 'all'"):
        SupConLoss(multilabel="all")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"keys": torch.randn(3, 8)}, ValueError, r"keys need key_labels \(\[M\] = \[3\] class ids"),
        ({"key_labels": torch.arange(3)}, ValueError, "key_labels were given without keys"),
        ({"keys": torch.randn(3, 7), "key_labels": torch.arange(3)}, ValueError, r"\[M, D\] with D = 8"),
        ({"keys": torch.ones(3, 8, dtype=torch.long), "key_labels": torch.arange(3)}, TypeError, "floating"),
        ({"keys": torch.randn(3, 8), "key_labels": torch.arange(4)}, ValueError, r"M = 3 keys.*\(4,\)"),
        ({"keys": torch.randn(3, 8), "key_labels": torch.ones(3)}, TypeError, "key_labels must be integer"),
        (
            {
                "labels": torch.eye(4, dtype=torch.bool),
                "keys": torch.randn(3, 8),
                "key_labels": torch.arange(3),
            },
            ValueError,
            r"\[B, B\] positive mask does not say which keys are positives",
        ),
        (
            {"labels": None, "keys": torch.randn(3, 8), "key_labels": torch.arange(3)},
            ValueError,
            "without labels every key is a negative",
        ),
        ({"multilabel": "all"}, ValueError, "unknown multilabel rule 'all'; valid rules: 'jaccard', 'any'"),
        ({"multilabel": "any"}, ValueError, r"multi-hot \[B, C\] with B = 4 samples.*\(4,\)"),
        ({"multilabel": "any", "labels": None}, TypeError, "multi-hot tensor with multilabel set"),
        (
            {
                "multilabel": "any",
                "labels": torch.ones(4, 3),
                "keys": torch.randn(2, 8),
                "key_labels": torch.ones(2, 5),
            },
            ValueError,
            r"key_labels must be multi-hot \[M, C\] with M = 2 keys and C = 3 labels.*\(2, 5\)",
        ),
    ],
)
def test_errors_keys_and_multilabel(kwargs, error, match):
    args = {"features": torch.randn(4, 2, 8), "labels": torch.tensor([0, 1, 0, 1])}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        supcon_loss(args.pop("features"), args.pop("labels"), **args)


def test_simclr_keys_are_negatives_moco_style():
    # MoCo's InfoNCE: one positive (the other view), the queue as negatives; L_out = L_in = npairs-free
    gen = torch.Generator().manual_seed(77)
    features = F.normalize(torch.randn(5, 2, 8, generator=gen, dtype=torch.float64), dim=-1)
    keys = F.normalize(torch.randn(9, 8, generator=gen, dtype=torch.float64), dim=1)
    z = torch.cat([features[:, 0], features[:, 1]])
    logits = z @ torch.cat([z, keys]).T / 0.07
    logits.fill_diagonal_(-math.inf)
    target = torch.cat([torch.arange(5, 10), torch.arange(5)])
    want = F.cross_entropy(logits, target)
    for variant in ("out", "in"):
        got = supcon_loss(features, None, temperature=0.07, variant=variant, keys=keys)
        assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", KEY_MODES)
@pytest.mark.parametrize("chunk", [None, 4])
def test_keys_and_multilabel_do_not_wait_for_the_device(mode, chunk):
    from sync_counter import SyncCounter

    gen = torch.Generator().manual_seed(78)
    features, labels, keys, key_labels, multilabel = make_key_case(mode, 2, gen)
    features = features.float().requires_grad_(True)
    kw = {"keys": keys.float(), "key_labels": key_labels, "multilabel": multilabel, "chunk_size": chunk}
    for variant in VARIANTS:
        supcon_loss(features, labels, variant=variant, **kw).backward()  # warm-up
        with SyncCounter() as c:
            supcon_loss(features, labels, variant=variant, **kw).backward()
        assert c.total == 0, (variant, c.counts)
