import math

import pytest
import torch
from torch import nn

from supcon.core.errors import UsageError
from supcon.train.optim import (
    LARS,
    OPTIMIZERS,
    LRSchedule,
    build_optimizer,
    build_scheduler,
    param_groups,
    scale_lr,
)


def toy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def toy_problem():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    return x, y


def train(opt_name, steps=30, **kw):
    model = toy_model()
    x, y = toy_problem()
    opt = build_optimizer(model, opt_name, **kw)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "name,kw",
    [
        ("sgd", dict(lr=0.05, weight_decay=1e-4)),
        ("sgd", dict(lr=0.05, nesterov=True)),
        ("adam", dict(lr=0.05)),
        ("adamw", dict(lr=0.05, weight_decay=0.05)),
        ("lars", dict(lr=1.0, weight_decay=1e-4, eta=0.02)),
    ],
)
def test_a_few_steps_decrease_a_toy_loss(name, kw):
    losses = train(name, **kw)
    assert losses[-1] < 0.1 * losses[0]


def test_no_weight_decay_on_biases_and_norm_parameters():
    model = toy_model()
    opt = build_optimizer(model, "sgd", lr=0.1, weight_decay=5e-4)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[3].bias),
    }
    # With zero gradients, decay shrinks only the weights.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = build_optimizer(model, "sgd", lr=1.0, weight_decay=0.1, momentum=0.0)
    opt.step()
    for n, p in model.named_parameters():
        if p.ndim > 1:
            torch.testing.assert_close(p, before[n] * 0.9)
        else:
            assert torch.equal(p, before[n])


def test_frozen_parameters_and_explicit_groups():
    model = toy_model()
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert all(p is not model[0].weight for g in groups for p in g["params"])
    custom = [{"params": [model[3].weight], "lr": 0.5}]
    assert param_groups(custom, 0.1) == custom
    with pytest.raises(UsageError, match="no trainable"):
        param_groups([], 0.1)


def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(UsageError, match="adam, adamw, lars, sgd"):
        build_optimizer(toy_model(), "rmsprop", lr=0.1)
    assert OPTIMIZERS.names() == ["adam", "adamw", "lars", "sgd"]


def test_options_reach_the_optimizers():
    m = toy_model()
    adam = build_optimizer(m, "adam", lr=1e-3, betas=(0.8, 0.9), eps=1e-7)
    assert isinstance(adam, torch.optim.Adam)
    assert adam.param_groups[0]["betas"] == (0.8, 0.9) and adam.param_groups[0]["eps"] == 1e-7
    sgd = build_optimizer(m, "sgd", lr=0.1, momentum=0.8, nesterov=True)
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["nesterov"]
    assert isinstance(build_optimizer(m, "adamw", lr=1e-3, weight_decay=0.05), torch.optim.AdamW)
    lars = build_optimizer(m, "lars", lr=0.1, eta=0.002)
    assert isinstance(lars, LARS) and lars.param_groups[0]["eta"] == 0.002
    with pytest.raises(UsageError, match="learning rate"):
        build_optimizer(m, "sgd", lr=0.0)


def test_scale_lr_linear_rule():
    assert scale_lr(0.5, 256) == 0.5
    assert scale_lr(0.5, 1024) == 2.0
    assert scale_lr(0.1, 64, base=128) == 0.05


def test_lars_trust_ratio_scales_the_step():
    # One weight matrix, one bias; no momentum, so the first step is exactly lr * q * d.
    w = nn.Parameter(torch.full((2, 2), 3.0))  # ||w|| = 6
    b = nn.Parameter(torch.ones(2))
    opt = LARS([w, b], lr=0.5, momentum=0.0, weight_decay=0.0, eta=0.01)
    w.grad = torch.full((2, 2), 0.5)  # ||g|| = 1
    b.grad = torch.full((2,), 0.5)
    opt.step()
    q = 0.01 * 6 / 1
    torch.testing.assert_close(w, torch.full((2, 2), 3.0 - 0.5 * q * 0.5))
    # The bias is excluded from adaptation: a plain SGD step.
    torch.testing.assert_close(b, torch.full((2,), 1.0 - 0.5 * 0.5))


def test_lars_trust_ratio_is_invariant_to_gradient_scale_and_includes_weight_decay():
    def step(grad_scale, wd):
        w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
        opt = LARS([w], lr=1.0, momentum=0.0, weight_decay=wd, eta=0.1)
        w.grad = torch.tensor([[1.0, 0.0]]) * grad_scale
        opt.step()
        return torch.tensor([[3.0, 4.0]]) - w.detach()

    # The update's size is eta * ||w|| * lr whatever the gradient's scale: layer-wise normalisation.
    for s in (1e-3, 1.0, 1e3):
        torch.testing.assert_close(step(s, 0.0), torch.tensor([[0.5, 0.0]]))
    # Weight decay enters the direction d = g + wd * w before the ratio is taken.
    d = torch.tensor([[1.0, 0.0]]) + 0.1 * torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(step(1.0, 0.1), 0.1 * 5 * d / d.norm())


def test_lars_zero_norms_fall_back_to_ratio_one_and_momentum_accumulates():
    w = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=0.1, momentum=0.9, eta=0.001)
    w.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(w, torch.full((2, 2), -0.1))  # ||w|| = 0 -> q = 1
    assert LARS.trust_ratio(torch.ones(3), torch.zeros(3), 0.001).item() == 1.0
    v = nn.Parameter(torch.ones(3))
    opt = LARS([{"params": [v], "lars_exclude": True}], lr=0.1, momentum=0.5, exclude_1d=False)
    for _ in range(2):
        v.grad = torch.ones(3)
        opt.step()
    # Plain momentum SGD: steps of 0.1 * 1 and 0.1 * (0.5 + 1).
    torch.testing.assert_close(v.detach(), torch.full((3,), 1.0 - 0.1 - 0.15))


def test_lars_excludes_1d_params_from_weight_decay_via_build_optimizer():
    model = toy_model()
    opt = build_optimizer(model, "lars", lr=0.1, weight_decay=0.5)
    assert opt.param_groups[1]["lars_exclude"] and opt.param_groups[1]["weight_decay"] == 0.0
    bias = model[0].bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(model[0].bias, bias)


def lrs(name, total, warmup=0, base=1.0, **kw):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = build_scheduler(opt, name, total_steps=total, warmup_steps=warmup, **kw)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_values():
    v = lrs("cosine", total=110, warmup=10, base=2.0, min_lr_ratio=0.1)
    assert v[0] == pytest.approx(2.0 * 1 / 10)
    assert v[4] == pytest.approx(2.0 * 5 / 10)
    assert v[9] == pytest.approx(2.0)
    assert v[10] == pytest.approx(2.0)  # cosine starts at the top
    assert v[60] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half way: the mean of top and floor
    assert v[35] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))))
    assert v[109] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 100))))
    assert all(a >= b for a, b in zip(v[10:], v[11:], strict=False))
    assert LRSchedule("cosine", 100, 0, 0.1)(100) == pytest.approx(0.1)
    assert LRSchedule("cosine", 100, 0, 0.1)(500) == pytest.approx(0.1)


def test_constant_and_step_schedules():
    v = lrs("constant", total=20, warmup=4, base=0.5)
    assert v[:5] == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5]) and v[-1] == 0.5
    v = lrs("step", total=100, base=1.0)
    assert v[69] == 1.0 and v[70] == pytest.approx(0.1) and v[80] == pytest.approx(0.01)
    assert v[99] == pytest.approx(0.001)
    v = lrs("step", total=10, milestones=[3], gamma=0.5)
    assert v[2] == 1.0 and v[3] == 0.5 and v[9] == 0.5


def test_scheduler_state_dict_resumes_exactly():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, "cosine", total_steps=50, warmup_steps=5)
    for _ in range(17):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_scheduler(opt2, "cosine", total_steps=50, warmup_steps=5)
    sched2.load_state_dict(state)
    for _ in range(5):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_unknown_schedule_and_bad_values():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(UsageError, match="constant, cosine, step"):
        build_scheduler(opt, "linear", total_steps=10)
    with pytest.raises(UsageError, match="total_steps"):
        build_scheduler(opt, "cosine", total_steps=0)
    with pytest.raises(UsageError, match="min_lr_ratio"):
        build_scheduler(opt, "cosine", total_steps=10, min_lr_ratio=2.0)


# ---------------------------------------------------------------------------- fine-tuning conventions


def _classifier(encoder="resnet18", seed=0):
    from supcon.models.build import Classifier
    from supcon.models.encoders import build_encoder
    from supcon.models.heads import LinearHead

    torch.manual_seed(seed)
    enc = build_encoder(encoder, width=4, blocks=[1, 1], stem="cifar", image_size=12, feature_dim=8)
    return Classifier(enc, LinearHead(enc.feature_dim, 3))


def _phase(**kw):
    from supcon.core.config import PhaseConfig

    return PhaseConfig(optimizer="sgd", momentum=0.0, lr=0.1, **kw)


def _backward(model):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, 12, 12, generator=g), torch.tensor([0, 1, 2] * 2)
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()


def _sgd_step(model, params, pc):
    opt = build_optimizer(params, "sgd", lr=pc.lr, momentum=0.0, weight_decay=pc.weight_decay)
    opt.zero_grad()
    _backward(model)
    opt.step()
    return opt


def test_defaults_give_exactly_todays_parameter_list():
    from supcon.train.optim import trainable_params

    model = _classifier()
    params = trainable_params(model, _phase())
    assert len(params) == len(list(model.parameters()))
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert all(p.requires_grad for p in model.parameters())


def test_backbone_lr_scale_matches_a_reference_step():
    from supcon.train.optim import trainable_params

    pc = _phase(backbone_lr_scale=0.1, weight_decay=0.01)
    model, ref = _classifier(), _classifier()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = _sgd_step(model, trainable_params(model, pc), pc)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1, pytest.approx(0.01), pytest.approx(0.01)]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0, 0.01, 0.0]
    # The reference: plain SGD on the same loss, each parameter's update written out.
    _backward(ref)  # the same gradients
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        lr = 0.1 * (0.1 if name.startswith("encoder.") else 1.0)
        wd = 0.01 if p.ndim > 1 else 0.0
        expected = before[name] - lr * (q.grad + wd * before[name])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)


def test_schedules_keep_the_backbone_ratio():
    from supcon.train.optim import trainable_params

    model = _classifier()
    opt = build_optimizer(trainable_params(model, _phase(backbone_lr_scale=0.25)), "adamw", lr=1.0)
    sched = build_scheduler(opt, "cosine", total_steps=10, warmup_steps=2)
    for _ in range(5):
        opt.step()
        sched.step()
        head, body = sched.get_last_lr()[0], sched.get_last_lr()[-1]
        assert head == pytest.approx(LRSchedule("cosine", 10, 2)(sched.last_epoch))
        assert body == pytest.approx(0.25 * head)


def test_freeze_bn_survives_train_and_keeps_statistics_and_affine():
    from supcon.train.optim import trainable_params

    pc = _phase(freeze_bn=True)
    model = _classifier()
    bns = [m for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [(m.running_mean.clone(), m.running_var.clone(), m.weight.detach().clone()) for m in bns]
    conv_before = model.encoder.conv1.weight.detach().clone()
    params = trainable_params(model, pc)
    model.train()  # what the loop does every epoch
    assert model.training and model.head.training and not any(m.training for m in bns)
    assert not any(m.weight.requires_grad or m.bias.requires_grad for m in bns)
    _sgd_step(model, params, pc)
    for m, (mean, var, w) in zip(bns, stats, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert torch.equal(m.weight, w) and int(m.num_batches_tracked) == 0
    assert not torch.equal(model.encoder.conv1.weight, conv_before)
    model.eval()
    model.train(True)
    assert not any(m.training for m in bns)


def test_freeze_stages_freezes_the_stem_and_first_stages():
    from supcon.train.optim import trainable_params

    pc = _phase(freeze_stages=2)  # the stem and layer1
    model = _classifier()
    enc = model.encoder
    frozen = {
        k: v.detach().clone()
        for k, v in enc.named_parameters()
        if k.split(".")[0] in {"conv1", "bn1", "layer1"}
    }
    assert len(frozen) == 2 + 1 + 6  # conv1, bn1 (2), layer1.0: 2 convs, 2 BNs (2 each)
    layer2 = enc.layer2[0].conv1.weight.detach().clone()
    _sgd_step(model, trainable_params(model, pc), pc)
    for k, v in enc.named_parameters():
        assert v.requires_grad == (k not in frozen), k
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert not enc.bn1.training and not enc.layer1[0].bn2.training and enc.layer2[0].bn1.training
    assert int(enc.bn1.num_batches_tracked) == 0 and int(enc.layer2[0].bn1.num_batches_tracked) == 1
    assert not torch.equal(enc.layer2[0].conv1.weight, layer2)


def test_freeze_stages_needs_a_resnet_and_a_stage_count_it_has():
    from supcon.train.optim import trainable_params

    with pytest.raises(UsageError, match="ce.freeze_stages: only the ResNet encoders"):
        trainable_params(_classifier("keras-cnn"), _phase(freeze_stages=1), "ce")
    with pytest.raises(UsageError, match="freeze_stages=4: this encoder has a stem and 2 stages"):
        trainable_params(_classifier(), _phase(freeze_stages=4), "ce")
    # Everything frozen but the head: still a valid optimisation.
    model = _classifier()
    params = trainable_params(model, _phase(freeze_stages=3, backbone_lr_scale=0.5))
    assert [p for g in params for p in g["params"]] == list(model.head.parameters())


def test_linear_probe_refuses_finetuning_options():
    from supcon.core.config import Config, validate

    cfg = Config()
    cfg.linear.freeze_bn = True
    with pytest.raises(UsageError, match="linear probe freezes all of it"):
        validate(cfg)
    cfg.linear.finetune = True
    validate(cfg)
