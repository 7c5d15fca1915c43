"""Fused CPU kernels for the seed CNN, built on first use with the system's C compiler.

- ``max_pool2_relu(x)``: ``relu(max_pool2d(x, 2))`` with its gradient, bit-identical to PyTorch's
  ops (``pool_relu.c``): one memory pass forward and one backward instead of PyTorch's five
  (pooling with int64 indices, ReLU, ReLU backward, zero-fill, scatter).
- ``conv3x3_pool2_relu(x, conv)``: ``relu(max_pool2d(conv(x), 2))`` for a first layer (3x3 "valid"
  convolution of an input that needs no gradient), without ever writing the convolution's output
  (``conv_pool_relu.c``); equal to PyTorch's ops up to float rounding (float32 sums in another order;
  under CPU bf16 autocast the same bf16 roundings of operands and output).

They apply on the CPU to channels-last float32 tensors and under bf16 autocast; everywhere else
(GPUs, other layouts and dtypes, no C compiler, or ``SUPCON_KERNELS=0``) these functions call
PyTorch's ops. The shared library is compiled once per source/compiler/CPU into
``<cache>/kernels/`` (the cache folder of ``supcon.core.files.default_root``; a private temporary
folder when there is none, as under a missing home folder) with ``$CC`` (else
``cc``, ``gcc`` or ``clang``), ``-O3 -march=native -fopenmp`` (``-march=x86-64-v3`` when PyTorch
itself is held to AVX2 with ``ATEN_CPU_CAPABILITY=avx2``); a failed build falls back to
PyTorch's ops, and ``kernel_status()`` says why. A cached library is loaded only from a folder that
no other user can write to and only if it matches the sha256 written beside it at build time;
otherwise it is rebuilt (a truncated one), or built afresh in a private temporary folder (a cache
folder that is shared or not ours), and ``kernel_status()`` says which.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F

SOURCES = [Path(__file__).with_name(n) for n in ("pool_relu.c", "conv_pool_relu.c", "winograd.c")]
HEADERS = [Path(__file__).with_name(n) for n in ("pool2.h", "gemm.h")]  # included by the sources
# gnu11: GCC/Clang vector extensions, and multiply-adds contracted into FMA instructions.
_FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC"]
_DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}
_status = "not built yet"


def max_pool2_relu(x: torch.Tensor) -> torch.Tensor:
    """``relu(max_pool2d(x, 2))`` for ``x`` of shape [N, C, H, W] -> [N, C, H // 2, W // 2]."""
    if _fusable(x) and _library() is not None:
        return _PoolReLU.apply(x)
    return F.max_pool2d(x, 2).relu_()


def conv3x3_pool2_relu(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """``relu(max_pool2d(conv(x), 2))`` for a 3x3, stride-1, unpadded ``conv`` of an input without grad."""
    rnd = _bf16_autocast()
    if _conv_fusable(x, conv, rnd) and _library() is not None:
        return _ConvPoolReLU.apply(x, conv.weight, conv.bias, rnd)
    return max_pool2_relu(conv(x))


def winograd_conv3x3_pool2_relu(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """``relu(max_pool2d(conv(x), 2))`` for a 3x3, stride-1, unpadded ``conv`` in float32, with
    Winograd's F(2x2, 3x3) and the pooling fused (``winograd.c``): 2.25x fewer multiply-adds than
    the direct convolution, forward and backward. Under autocast, for other shapes and dtypes, or
    without the C kernels, PyTorch's ``conv`` then :func:`max_pool2_relu`."""
    if _winograd_fits(x, conv):
        return _WinogradConvPoolReLU.apply(x, conv.weight, conv.bias)
    return max_pool2_relu(conv(x))


def kernel_status() -> str:
    """Whether the C kernels are in use, and if not, why (after the first attempt to build them)."""
    _library()
    return _status


def _fusable(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in _DTYPES
        and x.dim() == 4
        and x.shape[2] >= 2
        and x.shape[3] >= 2
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _bf16_autocast() -> bool | None:
    """True under CPU bf16 autocast, False without CPU autocast, None under another autocast dtype."""
    try:
        on, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    except (TypeError, AttributeError):  # torch < 2.4
        on, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    if not on:
        return False
    return True if dtype == torch.bfloat16 else None


def _conv_fusable(x: torch.Tensor, conv: torch.nn.Module, rnd: bool | None) -> bool:
    if rnd is None or not isinstance(conv, torch.nn.Conv2d):
        return False
    w = conv.weight
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and not x.requires_grad
        and (x.dtype == torch.float32 or (rnd and x.dtype == torch.bfloat16))
        and x.stride(1) == 1
        and x.shape[2] >= 4
        and x.shape[3] >= 4
        and w.device.type == "cpu"
        and w.dtype == torch.float32
        and _plain_conv3x3(conv)
        and w.shape[0] % 32 == 0
    )


def _plain_conv3x3(conv: torch.nn.Conv2d) -> bool:
    """A 3x3 convolution with a bias, stride 1, no padding, dilation or groups: what the kernels compute."""
    return (
        conv.bias is not None
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _winograd_fits(x: torch.Tensor, conv: torch.nn.Module) -> bool:
    if not isinstance(conv, torch.nn.Conv2d) or _bf16_autocast() is not False:
        return False  # under autocast the convolution runs in bf16 or fp16: PyTorch's ops serve
    w, lib = conv.weight, _library()
    return (
        lib is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.dim() == 4
        and x.shape[2] >= 4
        and x.shape[3] >= 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and _plain_conv3x3(conv)
        and x.shape[1] % lib.winograd_block_columns() == 0
        and w.shape[0] % lib.winograd_block_columns() == 0
    )


# F(2x2, 3x3)'s filter transform (Lavin & Gray 2016): U = G g G^T for each 3x3 filter g, as one
# matrix product with kron(G, G) [16, 9]; its gradient dg = G^T dU G with the transpose.
_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_GG = torch.kron(_G, _G)


def _filter_transform(weight: torch.Tensor) -> torch.Tensor:
    """[cout, cin, 3, 3] -> U [16, cin, cout]."""
    cout, cin = weight.shape[:2]
    g = weight.detach().float().permute(2, 3, 1, 0).reshape(9, cin * cout)  # [kh * 3 + kw, ci * cout + co]
    return (_GG @ g).view(16, cin, cout)


def _filter_gradient(du: torch.Tensor) -> torch.Tensor:
    """dU [16, cin, cout] -> dw [cout, cin, 3, 3]."""
    _, cin, cout = du.shape
    return (_GG.T @ du.view(16, cin * cout)).view(3, 3, cin, cout).permute(3, 2, 0, 1)


class _WinogradConvPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        n, cin, h, w = x.shape
        cout, ho, wo = weight.shape[0], (h - 2) // 2, (w - 2) // 2
        u = _filter_transform(weight)
        y = torch.empty((n, cout, ho, wo), memory_format=torch.channels_last)
        code = torch.empty((n, ho, wo, cout), dtype=torch.uint8)
        b = bias.detach().contiguous()
        _library().winograd_fwd(
            x.data_ptr(), u.data_ptr(), b.data_ptr(), y.data_ptr(), code.data_ptr(), n, h, w, cin, cout
        )
        ctx.save_for_backward(x, code, u)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, code, u = ctx.saved_tensors
        n, cin, h, w = x.shape
        cout = u.shape[2]
        g = g.contiguous(memory_format=torch.channels_last)
        ut = u.transpose(1, 2).contiguous()  # [16, cout, cin]
        dx = torch.empty_like(x, memory_format=torch.channels_last) if ctx.needs_input_grad[0] else None
        du, db = torch.empty((16, cin, cout)), torch.empty(cout)
        _library().winograd_bwd(
            x.data_ptr(), g.data_ptr(), code.data_ptr(), u.data_ptr(), ut.data_ptr(),
            dx.data_ptr() if dx is not None else None, du.data_ptr(), db.data_ptr(), n, h, w, cin, cout,
        )  # fmt: skip
        return dx, _filter_gradient(du), db


class _ConvPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rnd: bool):
        n, cin, h, w = x.shape
        cout = weight.shape[0]
        ho, wo = (h - 2) // 2, (w - 2) // 2
        # Autocast's operand rounding, done once on the (tiny) weights: [3, 3, cin, cout] float32.
        wt = (weight.to(torch.bfloat16) if rnd else weight).float().permute(2, 3, 1, 0).contiguous()
        b = (bias.to(torch.bfloat16) if rnd else bias).float().contiguous()
        y = torch.empty(
            (n, cout, ho, wo),
            dtype=torch.bfloat16 if rnd else torch.float32,
            memory_format=torch.channels_last,
        )
        code = torch.empty((n, ho, wo, cout), dtype=torch.uint8)
        sn, _, sh, sw = x.stride()
        args = (x.data_ptr(), int(x.dtype == torch.bfloat16), sn, sh, sw)
        _library().conv_pool_relu_fwd(
            *args, wt.data_ptr(), b.data_ptr(), y.data_ptr(), code.data_ptr(), n, cin, ho, wo, cout, int(rnd)
        )
        ctx.save_for_backward(x, code)
        ctx.rnd = rnd
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, code = ctx.saved_tensors
        n, cin, _, _ = x.shape
        _, ho, wo, cout = code.shape
        g = g.contiguous(memory_format=torch.channels_last)
        dw = torch.empty((3, 3, cin, cout))
        db = torch.empty(cout)
        sn, _, sh, sw = x.stride()
        _library().conv_pool_relu_bwd(
            x.data_ptr(), int(x.dtype == torch.bfloat16), sn, sh, sw, g.data_ptr(),
            int(g.dtype == torch.bfloat16), code.data_ptr(), dw.data_ptr(), db.data_ptr(),
            n, cin, ho, wo, cout, int(ctx.rnd),
        )  # fmt: skip
        return None, dw.permute(3, 2, 0, 1), db, None


class _PoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)
        # One byte per output: which of the 4 window positions won, or "no gradient" (ReLU gave 0).
        code = torch.empty((n, h // 2, w // 2, c), dtype=torch.uint8) if ctx.needs_input_grad[0] else None
        fn = getattr(_library(), f"pool_relu_{_DTYPES[x.dtype]}_fwd")
        fn(x.data_ptr(), y.data_ptr(), code.data_ptr() if code is not None else None, n, h, w, c)
        ctx.save_for_backward(code)
        ctx.in_shape = (h, w)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (code,) = ctx.saved_tensors
        n, _, _, c = code.shape
        h, w = ctx.in_shape
        g = g.contiguous(memory_format=torch.channels_last)
        gx = torch.empty((n, c, h, w), dtype=g.dtype, memory_format=torch.channels_last)
        fn = getattr(_library(), f"pool_relu_{_DTYPES[g.dtype]}_bwd")
        fn(g.data_ptr(), code.data_ptr(), gx.data_ptr(), n, h, w, c)
        return gx


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _status
    if os.environ.get("SUPCON_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        _status = "off (SUPCON_KERNELS=0): using PyTorch's ops"
        return None
    try:
        path, note = _build()
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _status = f"unavailable ({e}): using PyTorch's ops"
        return None
    i64, ptr, int_ = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    for name in _DTYPES.values():
        for kind in ("fwd", "bwd"):
            fn = getattr(lib, f"pool_relu_{name}_{kind}")
            fn.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64]
            fn.restype = None
    x_args = [ptr, int_, i64, i64, i64]  # data, is_bf16, strides of N, H, W
    shape_args = [i64, i64, i64, i64, i64, int_]  # N, cin, Ho, Wo, cout, round_bf16
    lib.conv_pool_relu_fwd.argtypes = [*x_args, ptr, ptr, ptr, ptr, *shape_args]
    lib.conv_pool_relu_bwd.argtypes = [*x_args, ptr, int_, ptr, ptr, ptr, *shape_args]
    lib.conv_pool_relu_fwd.restype = lib.conv_pool_relu_bwd.restype = None
    lib.conv_pool_relu_force_generic.argtypes = [int_]
    lib.conv_pool_relu_force_generic.restype = None
    lib.winograd_fwd.argtypes = [ptr] * 5 + [i64] * 5
    lib.winograd_bwd.argtypes = [ptr] * 8 + [i64] * 5
    lib.winograd_fwd.restype = lib.winograd_bwd.restype = None
    lib.winograd_block_columns.argtypes = []
    lib.winograd_block_columns.restype = int_
    _status = f"in use ({path})" + (f"; {note}" if note else "")
    return lib


def _cpu_signature() -> str:
    # -march=native code must not run on another CPU sharing the cache folder (a network home).
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor()


def _build() -> tuple[Path, str]:
    """The library's path, built if need be, and a note on anything unusual (else "").

    A library is loaded only from a folder that no other user can write to, and only when its
    checksum matches the one written at build time: a library planted in a shared folder would run
    as this user, and a truncated one crashes the process (SIGBUS) instead of failing to load.
    """
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    name = _library_name(cc)
    out_dir, problem = _cache_folder()
    if problem:
        # Never reuse anything from a shared folder: a fresh build in a folder only we can write.
        private = Path(tempfile.mkdtemp(prefix="supcon-kernels-"))
        atexit.register(shutil.rmtree, private, ignore_errors=True)  # the loaded library stays mapped
        return _compile(cc, private / name), f"built in {private}: {problem}"
    out = out_dir / name
    if not out.exists():
        return _compile(cc, out), ""
    bad = _damaged(out)
    if bad:
        return _compile(cc, out), f"rebuilt: the cached library {bad}"
    return out, ""


def _cache_folder() -> tuple[Path, str]:
    """``<cache>/kernels``, created private if missing, and why it must not be used (else "").

    A cache that cannot be had (no home folder, which is never created; a folder that cannot be
    made) is a reason like any other: the library is then built in a private temporary folder."""
    from supcon.core.errors import UsageError
    from supcon.core.files import default_root

    try:
        root = default_root()
    except UsageError as e:
        return Path(), str(e)
    out_dir = root / "kernels"
    try:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return out_dir, _untrusted(out_dir, root)
    except OSError as e:
        return out_dir, f"cache folder {out_dir} cannot be created ({e.strerror or e})"


def _arch_flags() -> list[str]:
    """The target of the build: this CPU (``-march=native``), except where PyTorch is told to use
    fewer instructions than the CPU has (``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 CPU): then the
    kernels stay within AVX2/FMA too, so that the whole step runs as on an AVX2-only CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine() in ("x86_64", "AMD64") and capability in ("AVX2", "DEFAULT"):
        flags = _cpu_signature()
        if " avx512f" in flags or "avx512f " in flags:
            return ["-march=x86-64-v3", "-mtune=native"] if capability == "AVX2" else ["-march=x86-64"]
    return ["-march=native"]


def _library_name(cc: str) -> str:
    """One name per source, compiler, flags and CPU."""
    parts = [p.read_bytes() for p in SOURCES + HEADERS]
    flags = " ".join([*_FLAGS, *_arch_flags()])
    key = hashlib.sha256(
        b"\0".join([*parts, cc.encode(), flags.encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]
    return f"supcon-{platform.machine()}-{key}.so"


def _untrusted(folder: Path, root: Path) -> str:
    """Why code in ``folder`` could have been written by another user, or "" if it could not.

    ``folder`` and the folders up to the cache root must be ours and writable by no one else;
    above the cache root, a folder may also be root's, or shared with the sticky bit (as /tmp is:
    others can create entries there but not rename or delete ours).
    """
    uid = os.getuid()
    folder, root = folder.absolute(), root.absolute()
    chain = [folder, *folder.parents]
    for d in chain:
        st = os.stat(d)
        strict = d == root or root in d.parents
        shared = st.st_mode & 0o022
        if strict and st.st_uid != uid:
            return f"{d} belongs to another user (uid {st.st_uid})"
        if strict and shared:
            return f"{d} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
        if st.st_uid not in (uid, 0):
            return f"{d} belongs to another user (uid {st.st_uid})"
        if shared and not st.st_mode & stat.S_ISVTX:
            return f"{d} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def _damaged(lib: Path) -> str:
    """Why ``lib`` must not be loaded (not ours, writable by others, checksum missing or wrong), or ""."""
    try:
        st = os.lstat(lib)
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file"
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            return "could have been written by another user"
        expected = _sidecar(lib).read_text().split()
    except OSError:
        return "has no checksum file"
    actual = [_sha256(lib), str(st.st_size)]
    return "" if expected == actual else "does not match its checksum (truncated or corrupt)"


def _sidecar(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _compile(cc: str, out: Path) -> Path:
    """Compile the sources to ``out`` (via a temporary file and a rename) and write its checksum file."""
    # Build beside the target and rename: ranks of a distributed run may build at the same time.
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    errors = []
    # Some compilers know neither -march=native nor OpenMP; without OpenMP the kernel runs on one thread.
    arch = _arch_flags()
    for extra in ([*arch, "-fopenmp"], ["-fopenmp"], arch, []):
        proc = subprocess.run(
            [cc, *_FLAGS, *extra, "-o", str(tmp), *map(str, SOURCES)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode == 0:
            side = _sidecar(out)
            side_tmp = side.with_name(f"{side.name}.{os.getpid()}.tmp")
            side_tmp.write_text(f"{_sha256(tmp)} {tmp.stat().st_size}\n")
            # Checksum first: a library is never in place without the checksum that vouches for it.
            # (Two ranks racing can pair one's checksum with the other's library; the next load
            # then rebuilds, which costs time, not correctness.)
            os.replace(side_tmp, side)
            os.replace(tmp, out)
            return out
        errors.append(
            proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        )
    tmp.unlink(missing_ok=True)
    raise RuntimeError(f"{cc} failed: {errors[0]}")
