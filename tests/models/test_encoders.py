import pytest
import torch
from torch.nn import functional as F

from supcon.core.errors import UsageError
from supcon.models.encoders import ENCODERS, build_encoder
from supcon.models.heads import DropoutDenseHead
from supcon.models.keras_cnn import KerasCNN


def test_seed_parameter_counts():
    enc = build_encoder("keras-cnn", in_channels=3, image_size=32, feature_dim=128)
    head = DropoutDenseHead(128, 10)
    n_enc = sum(p.numel() for p in enc.parameters())
    assert n_enc == 314_432
    assert n_enc + sum(p.numel() for p in head.parameters()) == 323_338


def test_keras_init_zero_biases_glorot_range():
    enc = KerasCNN()
    assert torch.count_nonzero(enc.conv1.bias) == 0 and torch.count_nonzero(enc.fc.bias) == 0
    fan_in, fan_out = 3 * 9, 32 * 9
    limit = (6 / (fan_in + fan_out)) ** 0.5
    w = enc.conv1.weight
    assert w.abs().max() <= limit and w.abs().max() > 0.9 * limit


def _plain_forward(enc, x):
    # The seed's layer order, written plainly: ReLU before pooling, full conv2 output.
    h = F.max_pool2d(F.relu(enc.conv1(x)), 2)
    h = F.max_pool2d(F.relu(enc.conv2(h)), 2)
    return enc.fc(h.permute(0, 2, 3, 1).flatten(1))


@pytest.mark.parametrize("size", [10, 11, 16, 31, 32, 33])
def test_fast_forward_equals_plain_forward(size):
    torch.manual_seed(0)
    enc = KerasCNN(image_size=size).double()
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    fast, plain = enc(x), _plain_forward(enc, x)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)
    g_fast = torch.autograd.grad(fast.square().sum(), list(enc.parameters()))
    g_plain = torch.autograd.grad(plain.square().sum(), list(enc.parameters()))
    for a, b in zip(g_fast, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_channels_last_same_result():
    torch.manual_seed(0)
    enc = KerasCNN()
    x = torch.rand(3, 3, 32, 32)
    a = enc(x)
    b = enc.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_too_small_image_is_refused():
    with pytest.raises(ValueError, match="at least 10x10"):
        KerasCNN(image_size=8)


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(UsageError, match="keras-cnn"):
        build_encoder("vgg-nope")
    assert "keras-cnn" in ENCODERS


# ---------------------------------------------------------------------------- timm encoders


def _timm_or_skip():
    try:
        import timm
    except Exception:  # absent, or unusable beside this torch (it needs torchvision)
        pytest.skip("timm is not usable here")
    return timm


@pytest.fixture
def no_timm(monkeypatch):
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ModuleNotFoundError
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "timm" else real(n, *a))


def test_timm_missing_names_the_extra(no_timm):
    from supcon.core.config import Config
    from supcon.runs.open import check_names

    with pytest.raises(UsageError, match=r"timm:resnet18.*not installed: pip install 'supcon\[timm\]'"):
        ENCODERS.get("timm:resnet18")
    cfg = Config()
    cfg.model.encoder = "timm:vit_tiny_patch16_224"
    with pytest.raises(UsageError, match=r"pip install 'supcon\[timm\]'"):
        check_names(cfg)  # before any data is loaded
    from supcon.models.encoders import TimmEncoder

    with pytest.raises(UsageError, match=r"not installed: pip install 'supcon\[timm\]'"):
        TimmEncoder("resnet18")


def test_registry_families():
    from supcon.core.registry import Registry

    reg = Registry("thing")
    seen = []

    @reg.register("plain")
    def plain(**kw):
        return ("plain", kw)

    @reg.register_family("fam", check=seen.append)
    def fam(name, **kw):
        return (name, kw)

    assert reg.get("fam:abc")(x=1) == ("abc", {"x": 1}) and seen == ["abc"]
    assert reg.get("plain")() == ("plain", {})
    assert "fam:abc" in reg and "fam:" not in reg and "other:abc" not in reg
    assert reg.names() == ["plain", "fam:<name>"]
    with pytest.raises(UsageError, match="name the model after 'fam:'"):
        reg.get("fam:")
    with pytest.raises(UsageError, match=r"unknown thing 'other:abc'; choose one of: plain, fam:<name>"):
        reg.get("other:abc")
    assert "timm:resnet18" in ENCODERS


class _FakeTimm:
    """timm's create_model contract: ``num_classes=0`` gives pooled features of ``num_features``;
    models without a fixed input size take no ``img_size`` (a TypeError)."""

    calls: list = []

    @staticmethod
    def create_model(name, pretrained, num_classes, in_chans, **kw):
        _FakeTimm.calls.append((name, pretrained, num_classes, in_chans, kw))
        if name == "unknown":
            raise RuntimeError("Unknown model (unknown)")
        if name == "cnn" and kw:
            raise TypeError("unexpected keyword argument 'img_size'")
        m = torch.nn.Sequential(
            torch.nn.Conv2d(in_chans, 6, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )
        m.num_features = 6
        return m


def test_timm_wrapper_with_a_stand_in_module(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", _FakeTimm)
    _FakeTimm.calls.clear()
    enc = build_encoder("timm:cnn", in_channels=1, image_size=20, width=8, blocks=[1], stem="auto")
    assert _FakeTimm.calls == [("cnn", False, 0, 1, {"img_size": 20}), ("cnn", False, 0, 1, {})]
    x = torch.randn(2, 1, 20, 20)
    assert enc.feature_dim == 6 and enc(x).shape == (2, 6)
    torch.testing.assert_close(enc.forward_features(x), enc.model(x))
    assert enc.weights_module is enc.model and list(enc.state_dict()) == ["model.0.weight", "model.0.bias"]
    with pytest.raises(UsageError, match="timm encoder 'unknown': Unknown model"):
        build_encoder("timm:unknown")


def test_real_timm_resnet_and_vit():
    timm = _timm_or_skip()
    enc = build_encoder("timm:resnet18", in_channels=3, image_size=32)
    assert enc.feature_dim == 512 and enc(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=0)
    assert list(enc.model.state_dict()) == list(ref.state_dict())
    vit = build_encoder("timm:vit_tiny_patch16_224", in_channels=3, image_size=32)
    assert vit.feature_dim == 192 and vit(torch.randn(2, 3, 32, 32)).shape == (2, 192)


def test_real_timm_checkpoint_loads_into_the_timm_encoder(tmp_path):
    timm = _timm_or_skip()
    from supcon.models.pretrained import load_pretrained

    src = timm.create_model("resnet18", pretrained=False, num_classes=10)  # with its classifier
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    enc = build_encoder("timm:resnet18", in_channels=3, image_size=32)
    report = load_pretrained(enc, tmp_path / "r18.pth", verbose=False)
    assert report.dropped == ["fc.weight", "fc.bias"] and not report.missing
    assert torch.equal(enc.model.conv1.weight, src.conv1.weight)


def test_every_built_in_encoder_is_registered_by_importing_the_encoders_module():
    # A fresh process: nothing else (run folders, the driver) has imported the ResNets' module.
    import subprocess
    import sys

    code = "from supcon.models.encoders import ENCODERS; print(' '.join(sorted(ENCODERS.names())))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert {"keras-cnn", "resnet18", "resnet50"} <= set(out.split())
