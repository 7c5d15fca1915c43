import pytest
import torch
from torch.nn import functional as F

from supcon.encoders import ENCODERS, KerasCNN, build_encoder
from supcon.errors import UsageError
from supcon.heads import DropoutDenseHead


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
