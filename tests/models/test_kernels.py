import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from supcon.models import kernels
from supcon.models.kernels import max_pool2_relu

needs_kernel = pytest.mark.skipif(
    kernels._library() is None, reason=f"C kernels not built here: {kernels.kernel_status()}"
)


def reference(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2).relu_()


def _pair(x: torch.Tensor, g_seed: int = 0):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = reference(xa), max_pool2_relu(xb)
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(g_seed)).to(x.dtype)
    ya.backward(g)
    yb.backward(g)
    return ya, yb, xa.grad, xb.grad


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Equal values (NaN where NaN), in the same memory layout.
    return torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and a.stride() == b.stride()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", [(2, 8, 6, 6), (3, 5, 7, 9), (4, 32, 28, 28), (2, 64, 12, 12), (1, 33, 2, 3), (5, 3, 4, 5)]
)
def test_matches_pytorch_bit_for_bit(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    for kind in ("random", "ties", "nan"):
        x = torch.randn(shape, generator=gen)
        if kind == "ties":  # small integers: many equal values in a window, many all-negative windows
            x = (x * 1.5).round()
        if kind == "nan":
            x.view(-1)[::7] = float("nan")
            x.view(-1)[3::11] = float("-nan")
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        ya, yb, ga, gb = _pair(x)
        assert _same(ya, yb), kind
        assert _same(ga, gb), kind
        assert yb.is_contiguous(memory_format=torch.channels_last)
        assert gb.is_contiguous(memory_format=torch.channels_last)


@needs_kernel
def test_kernel_runs_for_channels_last_cpu_tensors():
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = max_pool2_relu(x)
    assert type(y.grad_fn).__name__ == "_PoolReLUBackward"
    # Other layouts and dtypes take PyTorch's ops (same results).
    nchw = torch.randn(2, 4, 6, 6, requires_grad=True)
    assert type(max_pool2_relu(nchw).grad_fn).__name__ != "_PoolReLUBackward"
    assert torch.equal(max_pool2_relu(nchw), reference(nchw))
    x64 = torch.randn(2, 4, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert torch.equal(max_pool2_relu(x64), reference(x64))


@needs_kernel
def test_same_result_on_one_and_two_threads_and_without_grad():
    x = torch.randn(7, 32, 28, 28).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _pair(x)
        torch.set_num_threads(2)
        two = _pair(x)
    finally:
        torch.set_num_threads(threads)
    assert all(_same(a, b) for a, b in zip(one, two, strict=True))
    with torch.inference_mode():
        assert _same(max_pool2_relu(x), reference(x))


@needs_kernel
def test_encoder_gradients_match_pytorch_ops(monkeypatch):
    from supcon.models import keras_cnn as encoders

    torch.manual_seed(0)
    enc = encoders.KerasCNN().to(memory_format=torch.channels_last)
    x = torch.rand(6, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def grads():
        enc.zero_grad()
        enc(x).square().sum().backward()
        return [p.grad.clone() for p in enc.parameters()]

    fused = grads()
    monkeypatch.setattr(encoders, "winograd_conv3x3_pool2_relu", lambda x, conv: reference(conv(x)))
    monkeypatch.setattr(encoders, "conv3x3_pool2_relu", lambda x, conv: reference(conv(x)))
    plain = grads()
    assert all(_rel(a, b) < 1e-5 for a, b in zip(fused, plain, strict=True))


def _status_in_subprocess(env: dict) -> str:
    code = "import supcon.models.kernels as k; print(k.kernel_status())"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_switch_off_and_missing_compiler_fall_back_to_pytorch(tmp_path):
    assert _status_in_subprocess({"SUPCON_KERNELS": "0"}).startswith("off")
    status = _status_in_subprocess(
        {"CC": "/nonexistent/cc", "SUPCON_DATA": str(tmp_path), "SUPCON_KERNELS": "1"}
    )
    assert status.startswith("unavailable"), status
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind


def test_fallback_results_are_pytorchs(monkeypatch):
    monkeypatch.setattr(kernels, "_library", lambda: None)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    assert torch.equal(max_pool2_relu(x), reference(x))


# ---------------------------------------------------------------------------- conv3x3_pool2_relu


def _conv(cin=3, cout=32, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, 3)
    with torch.no_grad():
        conv.bias.normal_(0, 0.1)  # nonzero biases: their gradient is checked too
    return conv


def _image(n=4, cin=3, h=30, w=30, seed=0):
    x = torch.rand(n, h, w, cin, generator=torch.Generator().manual_seed(seed))
    return x.permute(0, 3, 1, 2)  # NHWC memory, as supcon's batches are


def _run(fn, x, conv, g, bf16: bool):
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = fn(x, conv)
    y.backward(g)
    return y, conv.weight.grad.clone(), conv.bias.grad.clone()


def _plain(x, conv):
    return F.max_pool2d(conv(x), 2).relu()


def _reference_bf16(x, conv, g):
    """Float64 truth of what CPU bf16 autocast computes: bf16 operands and conv output, exact sums."""
    w = conv.weight.detach().bfloat16().double().requires_grad_()
    b = conv.bias.detach().bfloat16().double().requires_grad_()
    o = F.conv2d(x.bfloat16().double(), w, b)
    o = o + (o.bfloat16().double() - o).detach()  # the output rounding; its gradient is the identity
    y = F.max_pool2d(o, 2).relu()
    y.backward(g.double())
    return y, w.grad, b.grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_kernel
@pytest.mark.parametrize("shape", [(4, 3, 30, 30), (3, 3, 31, 17), (2, 1, 12, 12), (2, 3, 4, 5)])
@pytest.mark.parametrize("cout", [32, 64])
def test_conv_kernel_float32_matches_pytorch(shape, cout):
    n, cin, h, w = shape
    conv = _conv(cin, cout)
    x = _image(n, cin, h, w)
    y_ref = _plain(x, conv)
    g = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1))
    ya, wa, ba = _run(kernels.conv3x3_pool2_relu, x, conv, g, bf16=False)
    yb, wb, bb = _run(_plain, x, conv, g, bf16=False)
    assert type(ya.grad_fn).__name__ == "_ConvPoolReLUBackward"
    assert ya.dtype == torch.float32 and ya.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    assert _rel(wa, wb) < 1e-5 and _rel(ba, bb) < 1e-5


@needs_kernel
@pytest.mark.parametrize("generic", [False, True], ids=["cpu-specific", "portable"])
def test_conv_kernel_bf16_autocast_is_closer_to_exact_than_pytorch(generic):
    conv = _conv()
    x = _image(8)[:, :, :30, :30]
    g = torch.randn((8, 32, 14, 14), generator=torch.Generator().manual_seed(2)).bfloat16()
    y_exact, w_exact, b_exact = _reference_bf16(x, conv, g)
    kernels._library().conv_pool_relu_force_generic(int(generic))
    try:
        ya, wa, ba = _run(kernels.conv3x3_pool2_relu, x, conv, g, bf16=True)
    finally:
        kernels._library().conv_pool_relu_force_generic(0)
    yb, wb, bb = _run(_plain, x, conv, g, bf16=True)
    assert ya.dtype == yb.dtype == torch.bfloat16
    # Outputs: bf16 roundings of float32 sums; sums in another order may round to the neighbour.
    assert (ya != yb).float().mean() < 1e-3
    torch.testing.assert_close(ya.float(), yb.float(), rtol=2**-7, atol=1e-6)
    # Gradients: float32 sums of exact bf16 products, vs PyTorch's gradient rounded to bf16.
    assert _rel(wa, w_exact) < 1e-4 and _rel(ba, b_exact) < 1e-4
    assert _rel(wb, w_exact) < 1e-2


@needs_kernel
def test_conv_kernel_is_deterministic_and_runs_without_grad():
    conv = _conv()
    x = _image(6)
    g = torch.randn(6, 32, 14, 14, generator=torch.Generator().manual_seed(3)).bfloat16()
    first, second = (_run(kernels.conv3x3_pool2_relu, x, conv, g, bf16=True) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(kernels.conv3x3_pool2_relu(x, conv), first[0])


def test_conv_kernel_leaves_other_cases_to_pytorch():
    conv = _conv()
    cases = [
        _image(2).contiguous(),  # NCHW: channels not innermost
        _image(2).requires_grad_(),  # the input needs a gradient: not a first layer
    ]
    for x in cases:
        y = kernels.conv3x3_pool2_relu(x, conv)
        assert type(y.grad_fn).__name__ != "_ConvPoolReLUBackward"
        torch.testing.assert_close(y, _plain(x, conv))
    strided = torch.nn.Conv2d(3, 32, 3, stride=2)
    x = _image(2)
    assert torch.equal(kernels.conv3x3_pool2_relu(x, strided), F.max_pool2d(strided(x), 2).relu())
    assert not kernels._conv_fusable(x, torch.nn.Conv2d(3, 16, 3), False)  # 16 channels: not a multiple of 32
    with torch.autocast("cpu", dtype=torch.float16):
        assert not kernels._conv_fusable(x, conv, kernels._bf16_autocast())


@needs_kernel
@pytest.mark.parametrize(
    "n, cin, h, w, cout, x_grad",
    [
        (7, 32, 14, 14, 64, True),
        (5, 32, 15, 13, 32, True),
        (3, 64, 9, 10, 32, False),
        (1, 32, 4, 4, 32, True),
    ],
)
def test_winograd_conv_pool_relu_matches_pytorch_ops(n, cin, h, w, cout, x_grad):
    # F(2x2, 3x3) adds and subtracts inputs before the products: equal to the direct convolution up
    # to float32 rounding, forward and backward, odd sizes (the floor pooling's unread row) included.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, 3).to(memory_format=torch.channels_last)
    x = torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last).requires_grad_(x_grad)
    y = kernels.winograd_conv3x3_pool2_relu(x, conv)
    assert "Winograd" in type(y.grad_fn).__name__
    want = reference(conv(x))
    assert y.shape == want.shape and _rel(y, want) < 1e-5
    g = torch.randn_like(y)
    wrt = (x, conv.weight, conv.bias) if x_grad else (conv.weight, conv.bias)
    got, ref = torch.autograd.grad(y, wrt, g), torch.autograd.grad(want, wrt, g)
    assert all(_rel(a, b) < 1e-5 for a, b in zip(got, ref, strict=True))
    if x_grad:  # the row and column the pooling never reads get no gradient
        assert got[0][:, :, 2 * (h // 2 - 1) + 2 :].abs().sum() == 0


@needs_kernel
def test_winograd_pooling_keeps_pytorchs_ties_and_the_relu_boundary():
    # Equal outputs within a window (a zero input gives the bias everywhere): the first position wins
    # the gradient, as in PyTorch's max-pool; negative maxima give 0 and no gradient.
    conv = torch.nn.Conv2d(32, 32, 3).to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.bias.copy_(torch.linspace(-1, 1, 32))
    x = torch.zeros(2, 32, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = kernels.winograd_conv3x3_pool2_relu(x, conv)
    want = reference(conv(x))
    assert torch.equal(y, want)
    gw = torch.autograd.grad(y, conv.bias, torch.ones_like(y))[0]
    assert torch.equal(gw, torch.autograd.grad(want, conv.bias, torch.ones_like(y))[0])


def test_winograd_is_left_to_pytorch_under_autocast_and_for_other_shapes():
    conv = torch.nn.Conv2d(32, 64, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.winograd_conv3x3_pool2_relu(x, conv)
    assert "Winograd" not in type(y.grad_fn).__name__
    odd = torch.nn.Conv2d(32, 20, 3)  # 20 output channels: not a multiple of a register block
    y = kernels.winograd_conv3x3_pool2_relu(x, odd)
    assert _rel(y, reference(odd(x))) == 0
