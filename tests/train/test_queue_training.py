"""Pre-training with a memory queue, a momentum encoder and a joint classifier (supcon.train.extras)."""

import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

import supcon
from supcon.commands import COMMANDS
from supcon.core.config import Config, load_preset, set_values
from supcon.core.errors import UsageError
from supcon.core.runtime import resolve_runtime
from supcon.core.stop import Interrupted, StopFlag
from supcon.data.datasets import load_split
from supcon.data.prefetch import TrainBatch
from supcon.experiments import JOINT_ROW, evaluate_folder
from supcon.losses.supcon import supcon_loss
from supcon.models.build import ContrastiveModel, load_phase_model
from supcon.runs.open import open_run
from supcon.train import phases, steps
from supcon.train.context import Run
from supcon.train.extras import JointNet, QueueModule, ema_update, momentum_copy

TINY = {"data.dataset": "digits", "precision": "fp32", "model.feature_dim": 32, "model.projection": "mlp",
        "model.projection_dim": 16, "loss.variant": "out", "loss.temperature": 0.1,
        "tune_cpu": False}  # fmt: skip


def _captured_phase(tmp_path, monkeypatch, overrides):
    """The pre-training phase as ``phases.pretrain`` hands it to the loop (the loop does not run)."""
    cfg = Config()
    set_values(cfg, TINY | overrides)
    rt = resolve_runtime("cpu", "fp32", False)
    data, split = load_split(cfg.data, cfg.seed, progress=False)
    got = {}
    monkeypatch.setattr(phases, "fit", lambda phase, run: got.setdefault("phase", phase))
    model = phases.pretrain(Run(cfg, rt, tmp_path, progress=False), data, split)
    return got["phase"], model, split


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_a_queue_step_is_the_loss_with_the_queues_keys_then_enqueues_its_keys(
    tmp_path, monkeypatch, momentum
):
    overrides = {"loss.queue_size": 40, "loss.key_momentum": momentum, "pretrain.views": 2}
    phase, model, split = _captured_phase(tmp_path, monkeypatch, overrides)
    queue = phase.module.queue.queue
    gen = torch.Generator().manual_seed(0)
    queue.enqueue(
        F.normalize(torch.randn(24, 16, generator=gen), dim=1), torch.randint(0, 10, (24,), generator=gen)
    )
    keys, key_labels = queue.keys()
    keys, key_labels = keys.clone(), key_labels.clone()
    ema = phase.module.ema
    assert (ema is not None) == (momentum is not None)
    if ema is not None:  # a momentum model that differs from the online one
        with torch.no_grad():
            for p in ema.parameters():
                p.add_(0.1)
    idx = torch.arange(8)
    out = phase.step(TrainBatch(idx), 8, torch.Generator())
    # no augmentation: the plain images, two identical views
    x = resolve_runtime("cpu", "fp32", False).images(split.train_x[idx]).repeat(2, 1, 1, 1)
    y = split.train_y[idx]
    z = model(x).view(2, 8, -1).transpose(0, 1)
    want = supcon_loss(z, y, temperature=0.1, variant="out", keys=keys, key_labels=key_labels)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    without = supcon_loss(z, y, temperature=0.1, variant="out")
    assert abs(without.item() - want.item()) > 1e-3  # the keys took part
    # the step enqueued this batch's keys (every view, view-major), normalised, after the loss
    new_keys, new_labels = queue.keys()
    assert len(queue) == 40 and queue.ptr == 0
    k = (model if ema is None else ema)(x).detach()
    torch.testing.assert_close(new_keys[24:], F.normalize(k, dim=1), rtol=1e-5, atol=1e-6)
    assert torch.equal(new_labels[24:], y.repeat(2))
    assert torch.equal(new_keys[:24], keys)


def test_ema_update_is_the_exponential_moving_average_and_copies_buffers():
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = momentum_copy(online)
    assert not any(p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in online.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online(torch.randn(5, 3))  # moves the running statistics
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, online, 0.9)
    for e, b, o in zip(ema.parameters(), before, online.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * o.detach())
    assert torch.equal(ema[1].running_mean, online[1].running_mean)
    assert torch.equal(ema[1].running_var, online[1].running_var)
    assert ema[1].num_batches_tracked.item() == online[1].num_batches_tracked.item() == 1


def test_the_momentum_update_runs_after_each_optimizer_step(tmp_path, monkeypatch):
    phase, model, _ = _captured_phase(
        tmp_path, monkeypatch, {"loss.queue_size": 16, "loss.key_momentum": 0.5}
    )
    ema = phase.module.ema
    assert phase.after_step is not None and all(p.requires_grad is False for p in ema.parameters())
    assert not {id(p) for p in ema.parameters()} & {id(p) for p in phase.params}  # not optimised
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = [p.clone() for p in ema.parameters()]
    phase.after_step()
    for e, b, o in zip(ema.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.5 * b + 0.5 * o.detach())


def test_the_queue_travels_in_the_state_dict_and_the_checkpoint_holds_model_ema_and_queue(
    tmp_path, monkeypatch
):
    q = QueueModule(6, 2)
    q.queue.enqueue(torch.arange(8.0).view(4, 2), torch.tensor([1, 2, 3, 4]))
    other = QueueModule(6, 2)
    other.load_state_dict(q.state_dict())
    assert other.queue.ptr == 4 and len(other.queue) == 4
    assert torch.equal(other.queue.keys()[0], q.queue.keys()[0])
    phase, _, _ = _captured_phase(tmp_path, monkeypatch, {"loss.queue_size": 16, "loss.key_momentum": 0.9})
    keys = phase.module.state_dict().keys()
    assert "queue._extra_state" in keys
    assert any(k.startswith("net.encoder.") for k in keys) and any(k.startswith("ema.encoder.") for k in keys)
    plain, _, _ = _captured_phase(tmp_path, monkeypatch, {})
    assert isinstance(plain.module, ContrastiveModel)  # without extras: checkpoints as before


@pytest.mark.parametrize("detach", [True, False])
def test_joint_cross_entropy_trains_the_encoder_only_without_stop_gradient(detach):
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    model = ContrastiveModel(enc, nn.Linear(6, 4))
    net = JointNet(model, nn.Linear(6, 3), detach=detach)
    z, logits = net(torch.randn(5, 3, 2, 2))
    assert z.shape == (5, 4) and logits.shape == (5, 3)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1])).backward()
    assert net.classifier.weight.grad is not None
    assert (enc[1].weight.grad is None) == detach


def test_key_momentum_needs_a_queue():
    with pytest.raises(UsageError, match="queue_size"):
        supcon.run("pretrain", overrides=TINY | {"loss.key_momentum": 0.9}, out="/nonexistent/never")


def _config(overrides):
    cfg = load_preset("keras-example")
    set_values(cfg, TINY | overrides)
    return cfg


@pytest.mark.slow
def test_stop_and_resume_with_queue_and_momentum_encoder_is_bit_identical(tmp_path, monkeypatch):
    overrides = {"loss.queue_size": 300, "loss.key_momentum": 0.9, "pretrain.epochs": 2,
                 "pretrain.batch_size": 128, "seed": 4}  # fmt: skip

    def train(out, resume=False):
        run = open_run(_config(overrides), out, resume=resume, progress=False)
        try:
            with run.stop:
                return COMMANDS["pretrain"].function()(run, None)
        finally:
            run.close()

    straight = train(tmp_path / "a")
    real, calls = steps.supcon_loss, []
    stop = StopFlag()

    def stop_on_fifth_step(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            stop.requested = True  # as SIGTERM would, inside the first epoch
        return real(*a, **k)

    monkeypatch.setattr(steps, "supcon_loss", stop_on_fifth_step)
    run = open_run(_config(overrides), tmp_path / "b", progress=False)
    run.stop = stop
    with pytest.raises(Interrupted) as e:
        COMMANDS["pretrain"].function()(run, None)
    run.close()
    assert re.search(r"pretrain-e0000\.000005\.pt$", str(e.value.args[0]))
    monkeypatch.setattr(steps, "supcon_loss", real)
    resumed = train(tmp_path / "b", resume=True)
    assert resumed["rows"][0]["test_acc"] == straight["rows"][0]["test_acc"]
    wa = load_file(str(tmp_path / "a" / "weights" / "pretrain.safetensors"))
    wb = load_file(str(tmp_path / "b" / "weights" / "pretrain.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ca = torch.load(tmp_path / "a" / "checkpoints" / "pretrain-e0002.pt", weights_only=False)["model"]
    cb = torch.load(tmp_path / "b" / "checkpoints" / "pretrain-e0002.pt", weights_only=False)["model"]
    qa, qb = ca.pop("queue._extra_state"), cb.pop("queue._extra_state")
    assert (qa["ptr"], qa["filled"]) == (qb["ptr"], qb["filled"]) and qa["filled"] == 300
    assert torch.equal(qa["features"], qb["features"]) and torch.equal(qa["labels"], qb["labels"])
    assert ca.keys() == cb.keys() and any(k.startswith("ema.") for k in ca)
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    # the momentum model moved away from the online one, yet follows it
    enc = [k for k in ca if k.startswith("net.encoder.") and k.endswith("weight")]
    assert any(not torch.equal(ca[k], ca["ema." + k[4:]]) for k in enc)


@pytest.mark.slow
def test_joint_training_reports_and_saves_its_classifier(tmp_path):
    overrides = TINY | {"loss.method": "supcon+ce", "pretrain.epochs": 1, "pretrain.batch_size": 64,
                        "pretrain.lr": 0.005, "loss.queue_size": 256, "knn_k": 20}  # fmt: skip
    results = supcon.run("pretrain", out=tmp_path / "r", overrides=overrides, progress=False)
    rows = {r["experiment"]: r["test_acc"] for r in results["rows"]}
    assert JOINT_ROW in rows and rows[JOINT_ROW] > 0.25  # ten classes: above chance (0.43 seen)
    w = tmp_path / "r" / "weights"
    joint = load_file(str(w / "joint.safetensors"))
    assert {"head.fc.weight", "head.fc.bias"} <= joint.keys()
    pre = load_file(str(w / "pretrain.safetensors"))
    assert all(torch.equal(joint[k], pre[k]) for k in pre if k.startswith("encoder."))  # the same encoder
    cfg = _config({"loss.method": "supcon+ce"})
    data, _ = load_split(cfg.data, 0, progress=False)
    assert isinstance(load_phase_model(cfg, data, "pretrain", w / "pretrain.safetensors"), ContrastiveModel)
    rows_again = evaluate_folder(tmp_path / "r", retrieval=False)["rows"]
    evaluated = {r["experiment"]: r["test_acc"] for r in rows_again}
    assert evaluated[JOINT_ROW] == pytest.approx(rows[JOINT_ROW])
    train_acc = [line for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all('"train_acc"' in line for line in train_acc)  # the joint classifier's, per epoch


def test_queue_momentum_and_joint_steps_wait_for_nothing(tmp_path, monkeypatch, one_thread):
    from _syncs import epoch_syncs

    overrides = {"loss.queue_size": 64, "loss.key_momentum": 0.9, "loss.method": "supcon+ce",
                 "model.feature_dim": 16}  # fmt: skip
    per_step, counts = epoch_syncs(tmp_path, monkeypatch, "pretrain", overrides)
    assert per_step <= 0.2, counts  # only the loop's running-loss reads and the epoch end
