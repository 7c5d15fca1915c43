import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from supcon.core.errors import UsageError
from supcon.models.encoders import build_encoder
from supcon.models.pretrained import load_pretrained, match_names, read_tensors


def small(stem="imagenet", seed=0, **kw):
    torch.manual_seed(seed)
    return build_encoder("resnet18", width=4, blocks=[1, 1], stem=stem, **kw)


def source():
    """A trained-looking encoder whose weights the tests save in various wrappings."""
    enc = small(seed=1)
    with torch.no_grad():
        for b in enc.buffers():
            b.add_(3)  # running stats and counters differ from a fresh encoder's too
    return enc


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_safetensors_plain(tmp_path, capsys):
    src = source()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = small()
    report = load_pretrained(dst, path)
    assert_same(dst, src)
    assert not report.missing and not report.unexpected
    assert f"loaded {len(src.state_dict())} encoder tensors from {path}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3, "arch": "r18"},
        lambda sd: {"model": {f"backbone.{k}": v for k, v in sd.items()}},
        lambda sd: {"encoder": sd},
        # DDP around a model whose encoder is a submodule, with a classifier beside it.
        lambda sd: {f"module.encoder.{k}": v for k, v in sd.items()} | {"module.head.w": torch.ones(3)},
        lambda sd: sd | {"fc.weight": torch.ones(10, 32), "fc.bias": torch.ones(10)},
    ],
)
def test_pth_wrappers_and_prefixes(tmp_path, wrap):
    src = source()
    path = tmp_path / "w.pth"
    torch.save(wrap(src.state_dict()), path)
    dst = small()
    report = load_pretrained(dst, path, verbose=False)
    assert_same(dst, src)
    assert not report.missing and not report.unexpected


def test_a_supcon_runs_own_weights_load(tmp_path):
    # weights/pretrain.safetensors holds encoder.* and projection.* (models.ContrastiveModel).
    from supcon.core.checkpoint import save_weights
    from supcon.models.build import ContrastiveModel

    src = source()
    model = ContrastiveModel(src, torch.nn.Linear(src.feature_dim, 8))
    path = tmp_path / "pretrain.safetensors"
    save_weights(model, path)
    dst = small()
    report = load_pretrained(dst, path, verbose=False)
    assert_same(dst, src)
    assert not report.unexpected  # the projection head is not the encoder's


def test_torchvision_names_load_into_the_cifar_stem_and_back(tmp_path):
    # downsample.* (torchvision) and shortcut.* (the CIFAR ResNets) are the same layers.
    src = small(stem="cifar", seed=1)
    renamed = {k.replace(".shortcut.", ".downsample."): v for k, v in src.state_dict().items()}
    assert any(".downsample." in k for k in renamed)
    torch.save(renamed, tmp_path / "tv.pt")
    dst = small(stem="cifar")
    load_pretrained(dst, tmp_path / "tv.pt", verbose=False)
    assert_same(dst, src)


def test_missing_and_unexpected_are_reported(tmp_path, capsys):
    src = source()
    sd = src.state_dict()
    del sd["layer2.0.conv1.weight"]
    sd["layer9.extra.weight"] = torch.ones(2)
    torch.save(sd, tmp_path / "w.bin")
    dst = small()
    before = dst.layer2[0].conv1.weight.detach().clone()
    report = load_pretrained(dst, tmp_path / "w.bin")
    assert report.missing == ["layer2.0.conv1.weight"] and report.unexpected == ["layer9.extra.weight"]
    assert torch.equal(dst.layer2[0].conv1.weight, before)  # kept its initial value
    assert torch.equal(dst.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    out = capsys.readouterr().out
    assert "missing 1 (kept initial): layer2.0.conv1.weight" in out
    assert "unexpected 1 (ignored): layer9.extra.weight" in out


def test_another_architecture_is_refused(tmp_path):
    torch.save(small(stem="cifar").state_dict(), tmp_path / "cifar.pt")
    with pytest.raises(UsageError, match=r"shapes differ.*conv1\.weight \[4, 3, 3, 3\] vs \[4, 3, 7, 7\]"):
        load_pretrained(small(stem="imagenet"), tmp_path / "cifar.pt", verbose=False)
    # The Keras example's CNN has a conv1 too, of other shape.
    torch.save(build_encoder("keras-cnn").state_dict(), tmp_path / "keras.pt")
    with pytest.raises(UsageError, match=r"conv1\.weight \[32, 3, 3, 3\] vs \[4, 3, 7, 7\]"):
        load_pretrained(small(), tmp_path / "keras.pt", verbose=False)
    vit = {"patch_embed.proj.weight": torch.ones(8, 3, 4, 4), "blocks.0.attn.qkv.weight": torch.ones(24, 8)}
    save_file(vit, str(tmp_path / "vit.safetensors"))
    with pytest.raises(UsageError, match="none of its 2 tensor names match.*patch_embed.*another archi"):
        load_pretrained(small(), tmp_path / "vit.safetensors", verbose=False)


class _Payload:
    """Unpickling this would run os.system: weights_only must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo unpickled > /dev/null",))


def test_a_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": 1.0, "x": _Payload()}, f, protocol=2)
    with pytest.raises(UsageError, match="refused.*weights_only=True"):
        read_tensors(path)
    torch.save({"state_dict": small().state_dict(), "run": _Payload()}, tmp_path / "evil2.pt")
    with pytest.raises(UsageError, match="refused"):
        load_pretrained(small(), tmp_path / "evil2.pt", verbose=False)


def test_bad_files(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        read_tensors(tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(UsageError, match="unknown file type"):
        read_tensors(tmp_path / "w.npz")
    (tmp_path / "w.safetensors").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="unreadable"):
        read_tensors(tmp_path / "w.safetensors")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(UsageError, match="no tensors"):
        read_tensors(tmp_path / "empty.pt")


def test_match_names_keeps_a_models_own_prefix():
    t = torch.zeros(1)
    names = {"model.weight", "encoder.bias"}
    assert match_names({"model.weight": t, "encoder.bias": t}, names).keys() == names
    assert match_names({"module.model.weight": t}, names).keys() == {"model.weight"}


@pytest.mark.slow
def test_a_run_starts_from_the_file_and_keeps_what_is_frozen(tmp_path, capsys):
    # train-ce through the loop (which calls train() every epoch): with the whole encoder frozen
    # (stem + 2 stages, BatchNorm too) the saved encoder is exactly the file's.
    from safetensors.torch import load_file

    import supcon
    from supcon.data.datasets import load_dataset

    data = load_dataset("digits")
    src = small(stem="cifar", seed=5, in_channels=data.channels)  # not the run's seed-0 initial weights
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    overrides = {
        "data.dataset": "digits",
        "model.encoder": "resnet18",
        "model.width": 4,
        "model.blocks": [1, 1],
        "model.pretrained": str(tmp_path / "w.pth"),
        "ce.epochs": 1,
        "ce.batch_size": 512,
        "ce.freeze_stages": 3,
        "ce.freeze_bn": True,
        "precision": "fp32",
    }
    supcon.run("train-ce", out=tmp_path / "run", overrides=overrides, progress=False)
    assert f"loaded {len(src.state_dict())} encoder tensors" in capsys.readouterr().out
    saved = load_file(str(tmp_path / "run" / "weights" / "ce.safetensors"))
    for k, v in src.state_dict().items():
        assert torch.equal(saved[f"encoder.{k}"], v), k


def test_the_flag_and_the_config_reach_the_encoder(tmp_path, capsys):
    from types import SimpleNamespace

    from supcon.cli import build_parser, request
    from supcon.driver import resolve_config
    from supcon.models.build import build_classifier, build_encoder_for

    src = small(stem="imagenet", seed=3)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    args = ["train-ce", "--pretrained", str(tmp_path / "w.pt"), "--encoder", "resnet18"]
    args += ["--set", "model.width=4", "--set", "model.blocks=[1, 1]"]
    cfg = resolve_config(request(build_parser().parse_args(args)))
    assert cfg.model.pretrained == str(tmp_path / "w.pt") and cfg.model.stem == "auto"
    data = SimpleNamespace(channels=3, image_size=64, num_classes=3)  # 64 px: the ImageNet stem
    assert_same(build_classifier(cfg, data, pretrained=True).encoder, src)
    # Without pretrained=True (a finished phase's model, loaded from its own weights) the file is not read.
    fresh = build_encoder_for(cfg, data)
    assert fresh.stem == "imagenet" and not torch.equal(fresh.conv1.weight, src.conv1.weight)
    cfg.model.stem = "cifar"
    with pytest.raises(UsageError, match="shapes differ"):
        build_encoder_for(cfg, data, pretrained=True)


@pytest.mark.slow
def test_linear_probe_on_a_weights_file_without_a_pretraining_run(tmp_path):
    import supcon

    base = {"data.dataset": "digits", "model.encoder": "resnet18", "model.width": 4, "tune_cpu": False}
    supcon.run("pretrain", out=tmp_path / "pre", progress=False, overrides=base | {"pretrain.epochs": 1})
    weights = tmp_path / "pre" / "weights" / "pretrain.safetensors"
    out = supcon.run(
        "linear", out=tmp_path / "probe", progress=False,
        overrides=base | {"model.pretrained": str(weights), "linear.epochs": 1},
    )  # fmt: skip
    assert 0 < out["rows"][0]["test_acc"] <= 1
    from safetensors.torch import load_file

    probe, pre = load_file(str(tmp_path / "probe/weights/linear.safetensors")), load_file(str(weights))
    enc = {k: v for k, v in probe.items() if k.startswith("encoder.")}
    assert enc and all(torch.equal(v, pre[k]) for k, v in enc.items())  # the file's encoder, frozen
    with pytest.raises(UsageError, match="linear needs --from DIR .* or --pretrained FILE"):
        supcon.run("linear", out=tmp_path / "none", progress=False, overrides=base)
