import pytest
import torch
from torch import nn

from supcon.encoders import ENCODERS, build_encoder
from supcon.errors import UsageError
from supcon.resnet import BasicBlock, Bottleneck, CifarResNet, cifar_resnet, resnet18, resnet50


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
