"""``supcon export``: a trained run's model as TorchScript, ONNX or safetensors, with a JSON sidecar.

TorchScript and ONNX files take what an image file decodes to, so that no supcon code is needed to
use them: uint8 RGB (or greyscale) images **[B, S, S, C], NHWC, 0..255**, at the model's image size
(resize as ``preprocess`` in the sidecar says); ``/255``, the per-channel standardisation and the
NHWC -> NCHW transpose are inside the model. The batch size is free. Outputs: ``embeddings``
float32 [B, D], L2-normalised (``encoder`` or ``projection`` space), or ``logits`` float32
[B, classes] (``classifier``; softmax gives probabilities). A safetensors export holds the bare
network's weights (float input [B, C, S, S], standardised) and the model info in its metadata.
``FILE.json`` beside the file says all of this for that file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from supcon.core.errors import UsageError
from supcon.core.files import atomic_write, check_regular_output
from supcon.core.schema import short
from supcon.data.dataset import Normalize
from supcon.serve.inference import TrainedModel, load
from supcon.serve.options import EXPORT_FORMATS, EXPORT_SPACES


class Preprocessed(nn.Module):
    """uint8 images [B, S, S, C] (NHWC, 0..255) -> ``net``'s output; embeddings L2-normalised."""

    def __init__(self, net: nn.Module, norm: Normalize | None, channels: int, normalize_output: bool):
        super().__init__()
        self.net = net
        mean = norm.mean if norm is not None else (0.0,) * channels
        std = norm.std if norm is not None else (1.0,) * channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.normalize_output = normalize_output

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # A plain NCHW copy: the CPU-kernel fast paths take channels-last tensors only, and an
        # exported graph must hold PyTorch's own operators.
        x = ((images.permute(0, 3, 1, 2).float() / 255.0 - self.mean) * self.inv_std).contiguous()
        y = self.net(x)
        return F.normalize(y, dim=1) if self.normalize_output else y


@contextlib.contextmanager
def plain_ops():
    """PyTorch's operators instead of supcon's C kernels (``SUPCON_KERNELS=0``) while tracing."""
    before = os.environ.get("SUPCON_KERNELS")
    os.environ["SUPCON_KERNELS"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SUPCON_KERNELS", None)
        else:
            os.environ["SUPCON_KERNELS"] = before


def wrapped(model: TrainedModel, space: str) -> Preprocessed:
    """The network of ``space`` with the input preprocessing in front (CPU, eval mode)."""
    net = model.network(space).cpu().eval()
    return Preprocessed(net, model.norm, model.channels, space != "classifier").eval()


def sidecar(model: TrainedModel, fmt: str, space: str, out: Path, width: int) -> dict:
    """What ``FILE.json`` says: the input, the output, classes and preprocessing."""
    s, c = model.image_size, model.channels
    color = "RGB" if c == 3 else "greyscale" if c == 1 else f"{c} channels"
    if fmt == "safetensors":
        values = "pixel / 255, then (x - mean) / std per channel (normalization; none: [0, 1])"
        inp = {"dtype": "float32", "shape": ["batch", c, s, s], "layout": "NCHW", "values": values}
    else:
        inp = {
            "name": "images",
            "dtype": "uint8",
            "shape": ["batch", s, s, c],
            "layout": "NHWC",
            "values": f"0..255 {color}",
            "inside_the_model": ["/255", "(x - mean) / std", "NHWC -> NCHW"],
        }
    if space == "classifier":
        meaning = (
            f"class scores (softmax: probabilities); index i is classes[i] ({model.classifier_phase} weights)"
        )
        output = {"name": "logits", "shape": ["batch", width], "meaning": meaning}
    else:
        what = "encoder features" if space == "encoder" else "projection head outputs"
        norm = "L2-normalised" if fmt != "safetensors" else "not normalised"
        output = {"name": "embeddings", "shape": ["batch", width], "meaning": f"{what}, {norm}"}
    return {
        "file": out.name,
        "format": fmt,
        "space": space,
        "weights": model.encoder_phase if space != "classifier" else model.classifier_phase,
        "input": inp,
        "output": output,
        "image_size": s,
        "channels": c,
        "classes": model.classes,
        "normalization": model.info.get("normalization"),
        "preprocess": model.preprocess,
        "model": model.info.get("model"),
    }


def check_output(out: Path, overwrite: bool) -> None:
    for p in (out, _sidecar_path(out)):
        check_regular_output(p)  # a device node or FIFO is never replaced, --overwrite or not
        if p.exists() and not overwrite:
            raise UsageError(f"{p} exists; use --overwrite to replace it")


def _sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def _torchscript(module: Preprocessed, example: torch.Tensor, tmp: str) -> None:
    with warnings.catch_warnings():
        # Shape checks in Python are recorded as constants: right here, every input has one shape
        # but the batch size, which no such check reads.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # PyTorch deprecates TorchScript for torch.export; the format is kept for the C++ and
        # mobile runtimes that still load it (ONNX is the lasting choice).
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(tmp)


def _onnx(module: Preprocessed, example: torch.Tensor, tmp: str, output_name: str) -> None:
    """The torch.export-based exporter (dynamo), a dynamic batch dimension, weights inside the file."""
    batch = torch.export.Dim("batch")
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # its notes on absent torchvision operators concern no model here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (example,), dynamo=True, input_names=["images"], output_names=[output_name],
                dynamic_shapes={"images": {0: batch}}, verbose=False,
            )  # fmt: skip
    finally:
        onnx_log.setLevel(level)
    program.save(tmp, external_data=False)


def export_run(run_dir: str | Path, fmt: str, space: str = "encoder", out: str | Path | None = None,
               overwrite: bool = False) -> Path:  # fmt: skip
    """Export the ``space`` network of a run folder as ``fmt`` (torchscript, onnx or safetensors) to
    ``out`` (default ``RUN/export/<space><ext>``) and its sidecar ``<out>.json``. Returns ``out``."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format {short(fmt)}; choose one of: {', '.join(EXPORT_FORMATS)}")
    if space not in EXPORT_SPACES:
        raise UsageError(f"unknown space {short(space)}; choose one of: {', '.join(EXPORT_SPACES)}")
    if fmt == "onnx" and any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript")):
        raise UsageError("ONNX export needs onnx and onnxscript: pip install 'supcon[onnx]'")
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "export" / f"{space}{EXPORT_FORMATS[fmt]}"
    check_output(out, overwrite)
    model = load(run_dir, device="cpu")
    module = wrapped(model, space)
    s, c = model.image_size, model.channels
    example = torch.randint(
        0, 256, (2, s, s, c), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    with plain_ops(), torch.no_grad():
        width = int(module(example).shape[1])
        if fmt == "torchscript":
            atomic_write(out, lambda tmp: _torchscript(module, example, tmp))
        elif fmt == "onnx":
            name = "logits" if space == "classifier" else "embeddings"
            atomic_write(out, lambda tmp: _onnx(module, example, tmp, name))
        else:
            _safetensors(model, module.net, space, out)
    text = json.dumps(sidecar(model, fmt, space, out, width), indent=1)
    atomic_write(_sidecar_path(out), lambda tmp: Path(tmp).write_text(text))
    return out


def _safetensors(model: TrainedModel, net: nn.Module, space: str, out: Path) -> None:
    from supcon.core.checkpoint import save_weights

    save_weights(net, out, {"space": space, "model_info": json.dumps(model.info)})


def main(args: argparse.Namespace) -> int:
    out = export_run(args.from_dir, args.format, args.space, args.out, args.overwrite)
    info = json.loads(_sidecar_path(out).read_text())
    i, o = info["input"], info["output"]
    print(f"wrote {out} and {_sidecar_path(out).name}: input {i['dtype']} {i['shape']} ({i['layout']}), "
          f"output {o['name']} {o['shape']}")  # fmt: skip
    return 0
