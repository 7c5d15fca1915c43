import pytest
import torch
from torch import nn

from supcon.core.errors import UsageError
from supcon.models.heads import DropoutDenseHead, LinearHead, ProjectionHead


def test_mlp_head_is_linear_relu_linear_with_hidden_defaulting_to_input():
    h = ProjectionHead(32, 16)
    assert h.hidden_dim == 32
    layers = list(h.net)
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features) == (32, 32)
    assert (layers[2].in_features, layers[2].out_features) == (32, 16)
    x = torch.randn(5, 32)
    out = h(x)
    assert out.shape == (5, 16)
    torch.testing.assert_close(out, layers[2](torch.relu(layers[0](x))))


def test_mlp_head_with_batch_norm_and_hidden_dim():
    h = ProjectionHead(32, 8, hidden_dim=12, batch_norm=True)
    assert [type(m) for m in h.net] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert h.net[0].out_features == 12 and h.net[0].bias is None
    assert h(torch.randn(4, 32)).shape == (4, 8)


def test_linear_projection_head():
    h = ProjectionHead(32, 8, kind="linear")
    assert isinstance(h.net, nn.Linear) and h.hidden_dim is None
    assert h(torch.randn(3, 32)).shape == (3, 8)


def test_output_is_not_normalised():
    torch.manual_seed(0)
    out = ProjectionHead(16, 8)(torch.randn(10, 16) * 10)
    norms = out.norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))


def test_unknown_kind_lists_valid_ones():
    with pytest.raises(UsageError, match="mlp, linear"):
        ProjectionHead(8, kind="deep")


def test_linear_probe():
    h = LinearHead(64, 10)
    assert isinstance(h.fc, nn.Linear) and (h.fc.in_features, h.fc.out_features) == (64, 10)
    x = torch.randn(7, 64)
    torch.testing.assert_close(h(x), x @ h.fc.weight.T + h.fc.bias)


def test_dropout_dense_head_unchanged():
    h = DropoutDenseHead(16, 3).eval()
    assert h(torch.randn(2, 16)).shape == (2, 3)
