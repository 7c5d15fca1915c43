"""Device, precision and memory-format choices, resolved once per run, and the process-wide settings
that make training fast, each applied only by an explicit call.

Process-wide side effects (all named, all opt-in):

- :func:`tune_cpu`: flush denormals to zero and keep freed tensor memory mapped (glibc). The
  command line applies it for CPU runs unless the config says ``tune_cpu: false``; the Python API
  only when asked (``tune_cpu: true``).
- :func:`tune_cuda`: cuDNN autotuning (``cudnn.benchmark``, off in deterministic mode) and TF32
  matrix products for float32 work on GPUs that have it. Applied by :func:`resolve_runtime` on CUDA.
- :func:`seed_everything`: Python's, NumPy's and torch's global generators.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

from supcon.core.errors import UsageError

DEVICE_TYPES = ("cpu", "cuda", "mps")


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = plain float32
    channels_last: bool

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def images(self, x_uint8: torch.Tensor, norm=None) -> torch.Tensor:
        """uint8 [B, H, W, C] -> float32 [B, C, H, W] in [0, 1] on the device, standardised by
        ``norm`` (a ``datasets.Normalize``) when given.

        The permute of an NHWC tensor already has channels_last strides, so keeping that layout
        costs no copy; the division happens in place on the float copy.
        """
        x = x_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if norm is not None:
            mean = torch.tensor(norm.mean, device=self.device).view(1, -1, 1, 1)
            inv = 1.0 / torch.tensor(norm.std, device=self.device).view(1, -1, 1, 1)
            x = x.sub_(mean).mul_(inv)
        return x if self.channels_last else x.contiguous()

    def describe(self) -> str:
        prec = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[self.amp_dtype]
        return f"{self.device} | {prec} | {'channels_last' if self.channels_last else 'NCHW'}"


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bf16 convolutions natively (AVX512-BF16 or AMX): there bf16 is ~2x fp32."""
    try:
        return bool(
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
        ) and torch.backends.cpu.get_cpu_capability() in (
            "AVX512",
            "AVX512_BF16",
            "AMX",
        )
    except (AttributeError, RuntimeError):
        return False


def cuda_has_native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores exist from compute capability 8.0 (A100) on; older GPUs (V100, T4) only
    emulate bf16, slower than fp16, so ``auto`` picks fp16 there."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed tensor memory for reuse instead of handing it back to the OS.

    By default glibc serves large allocations (above a threshold that starts at 128 KiB) with fresh
    ``mmap`` regions, unmaps them on free and trims the top of its heap, so every training step
    page-faults its activations and gradients in again and the kernel zeroes each page first.
    Serving allocations up to 32 MiB (the largest glibc allows) from the heap and never trimming it
    makes steps reuse the same, already mapped memory; the process keeps its peak footprint. A no-op
    off glibc, or when the user tunes malloc through the environment (MALLOC_*_ or GLIBC_TUNABLES)
    or preloads another allocator. Returns whether the settings were applied.
    """
    if not sys.platform.startswith("linux") or "LD_PRELOAD" in os.environ:
        return False
    if any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: AttributeError elsewhere)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def tune_cpu() -> dict[str, bool]:
    """Process-wide CPU settings for training speed; returns what was applied.

    - Flush denormals to zero (TensorFlow's default on the CPU): gradients that drift into the
      denormal range otherwise slow every CPU kernel touching them by an order of magnitude.
      Values below 1.2e-38 become 0, so results differ from an untuned process in those bits.
    - :func:`keep_freed_memory`: no page faults for each step's buffers.
    """
    return {"flush_denormal": bool(torch.set_flush_denormal(True)), "keep_freed_memory": keep_freed_memory()}


def tune_cuda(deterministic: bool = False) -> None:
    """cuDNN picks the fastest convolution algorithms for the shapes it sees (not in deterministic
    mode), and float32 matrix products and convolutions may use TF32 tensor cores."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def check_device_name(name: str) -> None:
    """Refuse device names supcon does not train on (``meta``, typos) before anything runs."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_TYPES:
        raise UsageError(f"device {name!r} cannot train; use auto, cpu, cuda or cuda:N")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device_name(name)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name!r} requested but MPS is not available")
    return device


def resolve_precision(precision: str, dev: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``auto`` is bf16 where the hardware runs it natively (CPUs with
    AVX512-BF16/AMX, GPUs from compute capability 8.0), fp16 on older GPUs, fp32 elsewhere."""
    if precision == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if cuda_has_native_bf16(dev) else torch.float16
        return torch.bfloat16 if dev.type == "cpu" and cpu_has_fast_bf16() else None
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if amp is torch.float16 and dev.type == "cpu":
        raise UsageError("precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return amp


def resolve_runtime(device: str, precision: str, channels_last: bool, deterministic: bool = False) -> Runtime:
    dev = resolve_device(device)
    if dev.type == "cuda":
        tune_cuda(deterministic)
    return Runtime(dev, resolve_precision(precision, dev), channels_last)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
