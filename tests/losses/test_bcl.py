"""BCL (Zhu et al., CVPR 2022): the loss against a loop reference written from the equations and a
port of the authors' BalSCL; the logit adjustment; the model; a tiny end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from supcon.losses.bcl import BCLLoss, LogitAdjustedCE, bcl_loss, log_prior, logit_adjusted_ce
from supcon.models.bcl import BCLModel, CosineClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def reference_bcl(features, labels, prototypes, temperature):
    """L_BCL one anchor and one key at a time, in float64, from the equations:
    n_c = V * (samples of c) + 1, w_ij = n_{y_j} - [y_j = y_i], P(i) = keys of y_i but i,
    l_i = -1/|P(i)| sum_p log(exp(s_ip) / sum_{j != i} exp(s_ij) / w_ij), mean over anchors."""
    f = F.normalize(features.double(), dim=-1)
    c = F.normalize(prototypes.double(), dim=-1)
    batch, views, _ = f.shape
    anchors = [(f[b, v], int(labels[b])) for v in range(views) for b in range(batch)]
    keys = anchors + [(c[k], k) for k in range(len(c))]
    count = {k: 1 + views * sum(int(y) == k for y in labels) for k in range(len(c))}
    terms = []
    for i, (zi, yi) in enumerate(anchors):
        denominator = 0.0
        for j, (kj, yj) in enumerate(keys):
            if j != i:
                denominator = denominator + torch.exp(zi @ kj / temperature) / (count[yj] - (yj == yi))
        pos = [zi @ kj / temperature for j, (kj, yj) in enumerate(keys) if j != i and yj == yi]
        terms.append(-sum(p - torch.log(denominator) for p in pos) / len(pos))
    return sum(terms) / len(terms)


def authors_balscl(centers1, features, targets, num_classes, temperature):
    """The authors' BalSCL.forward (loss/contrastive.py), line for line; CPU, two views."""
    device = torch.device("cpu")
    batch_size = features.shape[0]
    targets = targets.contiguous().view(-1, 1)
    targets_centers = torch.arange(num_classes, device=device).view(-1, 1)
    targets = torch.cat([targets.repeat(2, 1), targets_centers], dim=0)
    batch_cls_count = torch.eye(num_classes)[targets].sum(dim=0).squeeze()

    mask = torch.eq(targets[: 2 * batch_size], targets.T).float().to(device)
    logits_mask = torch.scatter(
        torch.ones_like(mask), 1, torch.arange(batch_size * 2).view(-1, 1).to(device), 0
    )
    mask = mask * logits_mask

    features = torch.cat(torch.unbind(features, dim=1), dim=0)
    features = torch.cat([features, centers1], dim=0)
    logits = features[: 2 * batch_size].mm(features.T)
    logits = torch.div(logits, temperature)

    logits_max, _ = torch.max(logits, dim=1, keepdim=True)
    logits = logits - logits_max.detach()

    exp_logits = torch.exp(logits) * logits_mask
    per_ins_weight = (
        torch.tensor([batch_cls_count[i] for i in targets], device=device)
        .view(1, -1)
        .expand(2 * batch_size, 2 * batch_size + num_classes)
        - mask
    )
    exp_logits_sum = exp_logits.div(per_ins_weight).sum(dim=1, keepdim=True)

    log_prob = logits - torch.log(exp_logits_sum)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)

    loss = -mean_log_prob_pos
    return loss.view(2, batch_size).mean()


def authors_logit_adjust(x, target, cls_num_list, tau=1.0):
    """The authors' LogitAdjust.forward (loss/logitadjust.py), on the CPU."""
    cls_num_list = torch.tensor(cls_num_list, dtype=x.dtype)
    cls_p_list = cls_num_list / cls_num_list.sum()
    m_list = tau * torch.log(cls_p_list)
    return F.cross_entropy(x + m_list.view(1, -1), target)


def _data(batch, views, dim, classes, seed, labels=None):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(batch, views, dim, generator=g, dtype=torch.float64)
    c = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g) if labels is None else torch.tensor(labels)
    return f, y, c


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------

CASES = [
    # (batch, views, dim, classes, labels or None, temperature)
    (6, 2, 5, 3, None, 0.1),
    (8, 2, 4, 5, [0, 0, 0, 0, 0, 1, 1, 2], 0.07),  # long-tailed batch, classes 3 and 4 absent
    (5, 1, 3, 4, [0, 1, 2, 3, 3], 0.5),  # one view: classes seen once have only their prototype
    (4, 3, 6, 2, None, 0.2),
    (1, 1, 3, 3, [2], 1.0),  # a single anchor
]


@pytest.mark.parametrize("batch,views,dim,classes,labels,temperature", CASES)
def test_value_and_gradients_match_the_loop_reference(batch, views, dim, classes, labels, temperature):
    f, y, c = _data(batch, views, dim, classes, seed=batch * 10 + views, labels=labels)
    f1, c1 = f.clone().requires_grad_(True), c.clone().requires_grad_(True)
    f2, c2 = f.clone().requires_grad_(True), c.clone().requires_grad_(True)
    got = bcl_loss(f1, y, c1, temperature)
    want = reference_bcl(f2, y, c2, temperature)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(c1.grad, c2.grad, rtol=1e-8, atol=1e-12)
    assert c1.grad.abs().sum() > 0  # the prototypes learn from the loss


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_authors_balscl_on_random_data(seed):
    g = torch.Generator().manual_seed(seed)
    batch, classes = 12, 6
    f = F.normalize(torch.randn(batch, 2, 8, generator=g, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(classes, 8, generator=g, dtype=torch.float64), dim=-1)
    # A long-tailed draw: class k with probability proportional to 2^-k.
    y = torch.multinomial(2.0 ** -torch.arange(classes, dtype=torch.float64), batch, True, generator=g)
    f1, c1 = f.clone().requires_grad_(True), c.clone().requires_grad_(True)
    f2, c2 = f.clone().requires_grad_(True), c.clone().requires_grad_(True)
    got = bcl_loss(f1, y, c1, 0.1, normalize=False)
    want = authors_balscl(c2, f2, y, classes, 0.1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(c1.grad, c2.grad, rtol=1e-8, atol=1e-12)


def test_a_hand_computed_case():
    # One anchor z of class 0, keys [z (itself), c0, c1]: n_0 = 2, n_1 = 1, so both prototypes are
    # divided by 1 and the loss is log(e^{s0} + e^{s1}) - s0 with s_k = z . c_k / T.
    z = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    c = torch.tensor([[0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    s0, s1 = 0.6 / 0.5, 0.0
    want = math.log(math.exp(s0) + math.exp(s1)) - s0
    assert bcl_loss(z, torch.tensor([0]), c, 0.5).item() == pytest.approx(want, rel=1e-12)
    # Two samples of class 0, one view: for anchor 1 the keys of class 0 but itself are sample 2 and c0
    # (w = n_0 - 1 = 2); c1 is alone in class 1 (w = 1).
    z = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    t = 1.0
    s = {("a", "b"): 0.0, ("a", "c0"): 0.6, ("a", "c1"): 0.0, ("b", "c0"): 0.8, ("b", "c1"): 1.0}
    la = math.log((math.exp(s["a", "b"]) + math.exp(s["a", "c0"])) / 2 + math.exp(s["a", "c1"]))
    la -= (s["a", "b"] + s["a", "c0"]) / 2
    lb = math.log((math.exp(s["a", "b"]) + math.exp(s["b", "c0"])) / 2 + math.exp(s["b", "c1"]))
    lb -= (s["a", "b"] + s["b", "c0"]) / 2
    assert bcl_loss(z, torch.tensor([0, 0]), c, t).item() == pytest.approx((la + lb) / 2, rel=1e-12)


def test_every_anchor_has_a_positive_and_scale_does_not_matter():
    # One view, every class seen once: the prototype is each anchor's only positive; the loss is finite.
    f, y, c = _data(4, 1, 3, 4, seed=1, labels=[0, 1, 2, 3])
    loss = bcl_loss(f, y, c, 0.1)
    assert torch.isfinite(loss)
    # Rows are L2-normalised: scaling features and prototypes changes nothing.
    torch.testing.assert_close(bcl_loss(3.0 * f, y, 0.5 * c, 0.1), loss, rtol=1e-12, atol=1e-12)


def test_float32_is_stable_at_a_low_temperature():
    f, y, c = _data(16, 2, 8, 4, seed=2)
    want = reference_bcl(f, y, c, 0.01)
    got = bcl_loss(f.float().requires_grad_(True), y, c.float(), 0.01)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)


def test_an_empty_batch_gives_an_attached_zero():
    f = torch.zeros(0, 2, 4, requires_grad=True)
    c = torch.randn(3, 4, requires_grad=True)
    loss = bcl_loss(f, torch.zeros(0, dtype=torch.long), c, 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert c.grad is not None and c.grad.abs().sum() == 0


@pytest.mark.parametrize(
    "shape,labels,protos,match",
    [
        ((4, 4), [0, 1, 0, 1], (2, 4), r"\[B, V, D\]"),
        ((4, 2, 4), [0, 1, 0, 1], (2, 3), r"prototypes must have shape \[C, D\] with D = 4"),
        ((4, 2, 4), [0, 1, 0], (2, 4), "labels must be integer class ids"),
        ((4, 2, 4), [0, 1, 0, 2], (2, 4), r"labels must lie in \[0, 2\)"),
        ((4, 2, 4), [0, -1, 0, 1], (2, 4), r"labels must lie in \[0, 2\)"),
    ],
)
def test_bad_inputs_are_refused(shape, labels, protos, match):
    with pytest.raises(ValueError, match=match):
        bcl_loss(torch.randn(*shape), torch.tensor(labels), torch.randn(*protos), 0.1)


def test_the_module_wraps_the_function():
    f, y, c = _data(6, 2, 4, 3, seed=4)
    torch.testing.assert_close(BCLLoss(0.2)(f, y, c), bcl_loss(f, y, c, 0.2))


# ---------------------------------------------------------------------------------------------
# Logit adjustment
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, 1.0, 1.5])
def test_logit_adjusted_ce_matches_the_authors_and_the_formula(tau):
    g = torch.Generator().manual_seed(5)
    counts = [500, 120, 30, 5]
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (7,), generator=g)
    got = logit_adjusted_ce(x, y, torch.tensor(counts), tau)
    torch.testing.assert_close(got, authors_logit_adjust(x, y, counts, tau))
    prior = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    adjusted = x + tau * prior.log()
    by_hand = -(adjusted.log_softmax(1)[torch.arange(7), y]).mean()
    torch.testing.assert_close(got, by_hand)
    torch.testing.assert_close(LogitAdjustedCE(counts, tau)(x.float(), y), got.float())
    if tau == 0.0:
        torch.testing.assert_close(got, F.cross_entropy(x, y))


def test_logit_adjustment_with_a_class_without_images():
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0])
    loss = logit_adjusted_ce(x, y, torch.tensor([4, 2, 0]), 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert x.grad[:, 2].abs().max() == 0  # its softmax share is exactly zero
    # Equal to the CE over the two classes that have images.
    want = logit_adjusted_ce(x[:, :2].detach(), y, torch.tensor([4, 2]), 1.0)
    torch.testing.assert_close(loss.detach(), want)


def test_logit_adjustment_refuses_bad_counts():
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="must agree"):
        logit_adjusted_ce(x, y, torch.tensor([1, 2]), 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        logit_adjusted_ce(x, y, torch.tensor([1, -2, 3]), 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        logit_adjusted_ce(x, y, torch.tensor([0, 0, 0]), 1.0)


def test_tau_zero_is_plain_cross_entropy_even_with_an_empty_class():
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(logit_adjusted_ce(x, y, torch.tensor([3, 1, 0]), 0.0), F.cross_entropy(x, y))
    assert log_prior(torch.tensor([1, 3]), 2.0).tolist() == pytest.approx(
        [2 * math.log(0.25), 2 * math.log(0.75)]
    )


def test_the_losses_wait_only_for_their_cpu_checks():
    from supcon.losses.bcl import adjusted_ce, bcl_loss_unchecked
    from sync_counter import SyncCounter

    f, y, c = _data(8, 2, 4, 3, seed=6)
    f.requires_grad_(True)
    x = torch.randn(16, 3, requires_grad=True)
    adjust = log_prior(torch.tensor([5, 2, 1]))
    bcl_loss_unchecked(f, y, c, 0.1).backward()  # warm-up
    with SyncCounter() as unchecked:
        bcl_loss_unchecked(f, y, c, 0.1).backward()
        adjusted_ce(x, y.repeat(2), adjust).backward()
    assert unchecked.total == 0, unchecked.counts  # what the training step runs
    with SyncCounter() as checked:
        bcl_loss(f, y, c, 0.1)
    assert checked.total == 1, checked.counts  # the label range, read on the CPU only


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def test_cosine_classifier_is_the_authors_normed_linear():
    torch.manual_seed(0)
    clf = CosineClassifier(5, 3)
    torch.testing.assert_close(clf.weight.norm(dim=1), torch.ones(3))
    x = torch.randn(4, 5)
    want = 30 * F.normalize(x, dim=1) @ F.normalize(clf.weight.T, dim=0)  # NormedLinear, weight [in, C]
    torch.testing.assert_close(clf(x), want)
    assert clf(100 * x).abs().max() <= 30 + 1e-5


def test_bcl_model_prototypes_come_from_the_classifier_weights():
    from supcon.models.heads import ProjectionHead

    torch.manual_seed(0)
    encoder = torch.nn.Linear(6, 4)
    model = BCLModel(
        encoder, ProjectionHead(4, 3), CosineClassifier(4, 5), ProjectionHead(4, 3, batch_norm=True)
    )
    x, y = torch.randn(8, 6), torch.arange(8) % 5
    z, logits, protos = model(x)
    assert z.shape == (8, 3) and logits.shape == (8, 5) and protos.shape == (5, 3)
    torch.testing.assert_close(protos, model.prototype_head(model.classifier.weight))
    # L_BCL alone trains the classifier's weights through the prototypes.
    bcl_loss(z.view(4, 2, 3), y[:4], protos, 0.1).backward()
    assert model.classifier.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.prototype_head.parameters())


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_with_bcl_gives_the_bcl_classifier_row_and_eval_reloads_it(tmp_path):
    import supcon
    from supcon.core.runlog import read_metrics
    from supcon.data.datasets import load_split
    from supcon.models.build import load_phase_model
    from supcon.runs.folder import read_config

    out = tmp_path / "run"
    overrides = {
        "loss.method": "bcl",
        "loss.temperature": 0.1,
        "data.dataset": "digits",
        "data.imbalance": 10,
        "model.projection": "mlp",
        "model.projection_dim": 16,
        "pretrain.views": 2,
        "pretrain.augment": "crop-flip",
        "ce.epochs": 1,
        "pretrain.epochs": 2,
        "linear.epochs": 1,
        "precision": "fp32",
    }
    results = supcon.run("compare", out=out, overrides=overrides, progress=False)
    rows = {r["experiment"]: r for r in results["rows"]}
    assert set(rows) == {"cross-entropy", "BCL + frozen classifier", "BCL classifier"}
    bcl_row = rows["BCL classifier"]
    assert 0.0 <= bcl_row["test_acc"] <= 1.0 and bcl_row["phases"] == ["pretrain"]
    assert "group_acc" in bcl_row  # long-tailed training set: many/medium/few
    pre = [m for m in read_metrics(out) if m["phase"] == "pretrain"]
    assert len(pre) == 2 and all(math.isfinite(m["loss"]) and "train_acc" in m for m in pre)
    # The saved weights load back into the BCL model; eval finds the same classifier accuracy.
    cfg = read_config(out)
    data = load_split(cfg.data, cfg.seed)[0]
    model = load_phase_model(cfg, data, "pretrain", out / "weights" / "pretrain.safetensors")
    assert isinstance(model, BCLModel) and model.classifier.weight.shape[0] == data.num_classes
    evaluated = {
        r["experiment"]: r["test_acc"] for r in supcon.run("eval", from_dir=out, device="cpu")["rows"]
    }
    assert evaluated["BCL classifier"] == pytest.approx(bcl_row["test_acc"])


def test_bcl_pretraining_step_waits_only_for_the_loops_reads(tmp_path, monkeypatch):
    from _syncs import STEPS, epoch_syncs

    overrides = {"loss.method": "bcl", "model.projection": "mlp", "pretrain.views": 2}
    per_step, counts = epoch_syncs(tmp_path, monkeypatch, "pretrain", overrides)
    assert per_step <= 3 / STEPS + 1e-9, counts  # the loop: 2 running-loss reads + 1 epoch read
