import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from supcon.core.errors import UsageError
from supcon.models.encoders import ENCODERS, build_encoder
from supcon.models.resnet import BasicBlock, Bottleneck, CifarResNet, cifar_resnet, resnet18, resnet50


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registered_names():
    for name in ("resnet18", "resnet34", "resnet50"):
        assert name in ENCODERS
    enc = build_encoder("resnet18", in_channels=3, image_size=32, feature_dim=128, width=4, blocks=[1, 1])
    assert isinstance(enc, CifarResNet)


@pytest.mark.parametrize(
    "depth,params,feature_dim",
    # The CIFAR ResNets of the SupCon authors' resnet_big.py (encoder only, no fc).
    [(18, 11_168_832, 512), (34, 21_276_992, 512), (50, 23_500_352, 2048)],
)
def test_full_size_parameter_counts(depth, params, feature_dim):
    m = cifar_resnet(depth)
    assert n_params(m) == params
    assert m.feature_dim == feature_dim


def test_architecture_is_the_cifar_variant():
    m = resnet18(width=8)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert isinstance(m.layer1[0], BasicBlock)
    assert isinstance(resnet50(width=4, blocks=(1, 1, 1, 1)).layer1[0], Bottleneck)
    assert [len(getattr(cifar_resnet(34, width=4), f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]


@pytest.mark.parametrize(
    "kwargs,feature_dim",
    [
        (dict(width=8), 64),
        (dict(width=4, blocks=(1, 1, 1, 1)), 32),
        (dict(width=8, blocks=(1, 1)), 16),
        (dict(width=4, blocks=(1,), in_channels=1), 4),
    ],
)
def test_small_output_shapes(kwargs, feature_dim):
    m = resnet18(**kwargs)
    c = kwargs.get("in_channels", 3)
    x = torch.randn(3, c, 16, 16)
    out = m(x)
    assert out.shape == (3, feature_dim) and m.feature_dim == feature_dim
    assert torch.equal(m.forward_features(x), out)


def test_bottleneck_small_shapes_and_other_image_sizes():
    m = resnet50(width=4, blocks=(1, 1, 1, 1))
    assert m.feature_dim == 4 * 8 * 4
    for size in (8, 20):
        assert m(torch.randn(2, 3, size, size)).shape == (2, 128)


def test_initialisation():
    m = resnet18(width=8, blocks=(1, 1))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
        if isinstance(mod, nn.Conv2d):
            # Kaiming normal, fan_out: std = sqrt(2 / (out_channels * k * k)).
            fan_out = mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1]
            assert abs(mod.weight.std().item() - (2 / fan_out) ** 0.5) < 0.5 * (2 / fan_out) ** 0.5
    z = resnet18(width=8, blocks=(1, 1), zero_init_residual=True)
    assert torch.all(z.layer1[0].bn2.weight == 0) and torch.all(z.layer1[0].bn1.weight == 1)
    assert torch.all(resnet50(width=4, blocks=(1,), zero_init_residual=True).layer1[0].bn3.weight == 0)


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    m = resnet18(width=8, blocks=(1, 1, 1)).eval()
    x = torch.randn(4, 3, 16, 16)
    ref = m(x)
    m_cl = m.to(memory_format=torch.channels_last)
    out = m_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_trains_backward():
    torch.manual_seed(0)
    m = resnet18(width=4, blocks=(1, 1))
    x = torch.randn(8, 3, 12, 12)
    m(x).pow(2).mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_authors_state_dict_names_load():
    m = resnet18(width=4)
    keys = list(m.state_dict())
    assert keys[0] == "conv1.weight" and "layer4.1.bn2.running_var" in keys
    assert "layer2.0.shortcut.0.weight" in keys and "layer2.0.shortcut.1.weight" in keys


def test_bad_options():
    with pytest.raises(UsageError, match="18, 34, 50"):
        cifar_resnet(101)
    with pytest.raises(UsageError, match="blocks"):
        resnet18(blocks=(1, 1, 1, 1, 1))
    with pytest.raises(UsageError, match="blocks"):
        resnet18(blocks=(0, 1))
    with pytest.raises(UsageError, match="resnet18"):
        build_encoder("resnet19")


# ---------------------------------------------------------------------------- strided 1x1 guard

# Shapes that crashed the process in oneDNN's weight gradient of a strided 1x1 convolution
# (docs/onednn-bf16-crash.md), run through the model code in float32 and under bf16 autocast, with
# glibc's heap checks on: a corrupted heap aborts at once instead of some time later.
CRASH_SHAPES = r"""
import torch
from supcon.models.resnet import Conv1x1, resnet18, resnet50
torch.set_num_threads(1)
torch.manual_seed(0)
for bf16 in (False, True):
    for c in range(1, 9):
        conv = Conv1x1(c, 2 * c, stride=2).to(memory_format=torch.channels_last)
        for b in range(1, 8):
            for s in (8, 9, 16, 32):
                x = torch.randn(b, c, s, s).contiguous(memory_format=torch.channels_last).requires_grad_()
                with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    y = conv(x)
                y.float().square().sum().backward()
    print("shortcut convolutions ok", flush=True)
    models = [(f"resnet18 width={w}", resnet18(width=w)) for w in range(1, 9)]
    models.append(("resnet50 width=2", resnet50(width=2, blocks=(1, 1, 1, 1))))
    for name, m in models:
        for cl in (False, True):
            net = m.to(memory_format=torch.channels_last) if cl else m
            for b in (1, 3, 7, 14):  # batch 1, odd last batches, two views of one
                x = torch.randn(b, 3, 16, 16)
                x = x.contiguous(memory_format=torch.channels_last) if cl else x
                net.zero_grad()
                with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    y = net(x)
                y.float().square().sum().backward()
                assert all(torch.isfinite(p.grad).all() for p in net.parameters()), (name, cl, b)
        print("bf16" if bf16 else "fp32", name, "ok", flush=True)
print("done")
"""


def test_narrow_resnets_with_small_and_odd_batches_run_forward_and_backward():
    # A child process: a native crash there fails this test instead of ending the test run.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_CHECK_": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SHAPES], capture_output=True, text=True, timeout=600, env=env
    )
    last = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
    assert proc.returncode == 0, f"exit {proc.returncode} after {last[0]!r}: {proc.stderr[-1500:]}"
    assert last == ["done"]


@pytest.mark.parametrize("size", [8, 9])
def test_narrow_strided_shortcut_is_rerouted_with_the_same_results(size):
    from supcon.models import resnet

    narrow = resnet18(width=4)
    shortcuts = [getattr(narrow, f"layer{i}")[0].shortcut[0] for i in (2, 3, 4)]
    assert [(c.in_channels, c.out_channels) for c in shortcuts] == [(4, 8), (8, 16), (16, 32)]
    x = torch.randn(3, 4, size, size)
    assert [c.rerouted(x) for c in shortcuts] == [True, True, False]
    assert not any(m.rerouted(x) for m in resnet18().modules() if isinstance(m, resnet.Conv1x1))
    conv = shortcuts[0]
    plain = nn.Conv2d(4, 8, 1, stride=2, bias=False)  # NCHW float32: not the crashing kernel
    plain.weight.data.copy_(conv.weight.data)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = conv(xa), plain(xb)
    assert ya.shape == yb.shape == (3, 8, (size + 1) // 2, (size + 1) // 2)
    g = torch.randn(ya.shape)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad)
    with torch.autocast("cpu", torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16  # autocast applies as before
    # The state-dict keys of nn.Conv2d, so the authors' weights still load by name.
    assert "layer2.0.shortcut.0.weight" in narrow.state_dict()


# ---------------------------------------------------------------------------- ImageNet stem

TORCHVISION_PLAN = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    stats = ("weight", "bias", "running_mean", "running_var")
    return {f"{prefix}.{k}": (c,) for k in stats} | {f"{prefix}.num_batches_tracked": ()}


def torchvision_keys(depth: int) -> dict[str, tuple[int, ...]]:
    """torchvision's ``resnet{depth}().state_dict()`` without ``fc``: key -> shape, written out from its
    architecture (conv1 7x7, layerN.M.{conv,bn}K, downsample.0 conv / .1 BN on each stage's first block)."""
    kind, blocks = TORCHVISION_PLAN[depth]
    keys = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inp, expansion = 64, 4 if kind == "bottleneck" else 1
    for stage, n in enumerate(blocks):
        planes = 64 * 2**stage
        for j in range(n):
            p = f"layer{stage + 1}.{j}"
            if kind == "basic":
                convs = [(planes, inp, 3, 3), (planes, planes, 3, 3)]
            else:
                convs = [(planes, inp, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)]
            for k, shape in enumerate(convs, 1):
                keys[f"{p}.conv{k}.weight"] = shape
                keys |= _bn(f"{p}.bn{k}", shape[0])
            if j == 0 and (stage > 0 or inp != planes * expansion):
                keys[f"{p}.downsample.0.weight"] = (planes * expansion, inp, 1, 1)
                keys |= _bn(f"{p}.downsample.1", planes * expansion)
            inp = planes * expansion
    return keys


@pytest.mark.parametrize("depth,n_keys,params", [(18, 120, 11_176_512), (50, 318, 23_508_032)])
def test_imagenet_stem_loads_a_torchvision_state_dict_strictly(depth, n_keys, params):
    expected = torchvision_keys(depth)
    assert len(expected) == n_keys  # torchvision's count, fc.weight and fc.bias left out
    g = torch.Generator().manual_seed(depth)
    count = "num_batches_tracked"
    state = {
        k: torch.randint(0, 5, s, generator=g) if k.endswith(count) else torch.randn(s, generator=g)
        for k, s in expected.items()
    }
    m = cifar_resnet(depth, stem="imagenet")
    assert n_params(m) == params  # torchvision's parameter count without fc
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    m.load_state_dict(state, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_cifar_stem_keeps_its_names_and_shapes():
    keys = dict((k, tuple(v.shape)) for k, v in resnet18().state_dict().items())
    tv = torchvision_keys(18)
    assert keys["conv1.weight"] == (64, 3, 3, 3)
    renamed = {k.replace(".downsample.", ".shortcut."): s for k, s in tv.items() if k != "conv1.weight"}
    assert {k: s for k, s in keys.items() if k != "conv1.weight"} == renamed


def test_imagenet_stem_forward_equals_a_plain_reference():
    torch.manual_seed(0)
    m = resnet18(width=4, blocks=(1, 1), stem="imagenet").eval()
    assert m.conv1.kernel_size == (7, 7) and m.conv1.stride == (2, 2)
    x = torch.randn(2, 3, 37, 37)
    h = F.conv2d(x, m.conv1.weight, stride=2, padding=3)
    h = F.batch_norm(h, m.bn1.running_mean, m.bn1.running_var, m.bn1.weight, m.bn1.bias, eps=m.bn1.eps)
    h = F.max_pool2d(F.relu(h), 3, stride=2, padding=1)  # 37 -> 19 -> 10
    assert h.shape[-1] == 10
    for name in m.layers:
        h = getattr(m, name)(h)
    torch.testing.assert_close(m(x), h.mean((2, 3)))
    # A downsampling block's projection runs (torchvision's name): layer2 halves 10 -> 5.
    blk = m.layer2[0]
    assert blk.shortcut_name == "downsample" and isinstance(blk.downsample[0], nn.Conv2d)


@pytest.mark.parametrize("size,stem", [(32, "cifar"), (63, "cifar"), (64, "imagenet"), (224, "imagenet")])
def test_auto_stem_follows_the_image_size(size, stem):
    enc = build_encoder("resnet18", in_channels=3, image_size=size, width=4, blocks=[1], stem="auto")
    assert enc.stem == stem
    assert build_encoder("resnet18", image_size=size, width=4, blocks=[1], stem="cifar").stem == "cifar"


def test_unknown_stem():
    with pytest.raises(UsageError, match="stem"):
        resnet18(stem="tiny")
