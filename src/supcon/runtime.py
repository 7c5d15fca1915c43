"""Device, precision and memory-format choices, resolved once per run."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

from supcon.errors import UsageError


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = plain float32
    channels_last: bool
    mean: tuple[float, ...] | None = None  # per-channel normalisation of inputs in [0, 1], if any
    std: tuple[float, ...] | None = None

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def images(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, C] -> float32 [B, C, H, W] in [0, 1] on the device.

        The permute of an NHWC tensor already has channels_last strides, so keeping that layout
        costs no copy; the division happens in place on the float copy.
        """
        x = x_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
            inv = 1.0 / torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
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


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed tensor memory for reuse instead of handing it back to the OS.

    By default glibc serves large allocations (above a threshold that starts at 128 KiB) with fresh
    ``mmap`` regions, unmaps them on free and trims the top of its heap, so every training step
    page-faults its activations and gradients in again and the kernel zeroes each page first. For
    the seed's CNN that was ~500 page faults and several ms per step of 256 images (a 12.8 MB
    gradient buffer took 3.9 ms to fill instead of ~0.4 ms). Serving allocations up to 32 MiB (the
    largest glibc allows) from the heap and never trimming it makes steps reuse the same, already
    mapped memory; the process keeps its peak footprint. A no-op off glibc, or when the user tunes
    malloc through the environment (MALLOC_*_ or GLIBC_TUNABLES) or preloads another allocator.
    Returns whether the settings were applied.
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_runtime(device: str, precision: str, channels_last: bool) -> Runtime:
    dev = resolve_device(device)
    if dev.type == "cpu":
        # Flush denormals to zero, as TensorFlow does on the CPU by default: tiny gradients that drift
        # into the denormal range otherwise slow every CPU kernel touching them by 10-40x (measured on the
        # seed's cross-entropy step: 4.6 s -> 0.12 s per batch of 256). Values below 1.2e-38 become 0.
        torch.set_flush_denormal(True)
        keep_freed_memory()
    if precision == "auto":
        if dev.type == "cuda":
            amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            amp = torch.bfloat16 if cpu_has_fast_bf16() else None
    else:
        amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if amp is torch.float16 and dev.type == "cpu":
        raise UsageError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return Runtime(dev, amp, channels_last)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
