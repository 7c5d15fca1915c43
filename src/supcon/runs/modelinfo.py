"""``model.json``: what a user of a run's weights needs besides the weights.

Class names, image size and channels, the input standardisation, the model's architecture (the
``model`` section of the config) and how to prepare an image for it. Written at the start of
training (rank 0), so that :func:`supcon.load`, ``supcon embed`` and ``supcon export`` need neither
the dataset nor the training config. Older run folders have none: :func:`read_model_info` then
rebuilds it from ``config.yaml`` and the dataset, or says what is missing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from supcon.core.config import MAX_IMAGE_SIZE, Config, from_dict, read_config_file, validate
from supcon.core.errors import UsageError
from supcon.core.files import atomic_write
from supcon.core.schema import check_value, field, load_json, number_list, read_text
from supcon.data.dataset import ImageDataset
from supcon.data.imageset import storage_side
from supcon.models.encoders import ENCODERS
from supcon.models.resnet import resolve_stem

MODEL_INFO = "model.json"
FORMAT = 1


def preprocess_for(data: ImageDataset) -> dict[str, Any]:
    """How an image file becomes a model input, as the dataset prepared its own images.

    In-memory datasets (digits, CIFAR, decoded image folders) hold every image at ``image_size``
    (image folders resized each one to a square, bilinear): other images are resized the same way.
    Stored large-image sets (any image set that is not one tensor) resize the short side to
    ``image_size / CROP_PCT`` (0.875: 224 of 256, the usual ImageNet evaluation) and crop the centre.
    """
    size = data.image_size
    if isinstance(data.train_x, torch.Tensor):
        return {"resize": "square", "size": size, "interpolation": "bilinear"}
    short = storage_side(size)
    return {
        "resize": "short-side",
        "resize_to": short,
        "crop": "center",
        "size": size,
        "interpolation": "bilinear",
    }


def model_info(cfg: Config, data: ImageDataset) -> dict[str, Any]:
    """The ``model.json`` of a run of ``cfg`` on ``data`` (a JSON-able dict)."""
    norm = None if data.norm is None else {"mean": list(data.norm.mean), "std": list(data.norm.std)}
    m = cfg.model
    # "auto" choices that shape the weights are stored as decided, so a run loads as it was trained
    # even if the rule that decides them changes.
    model = dataclasses.asdict(m) | {"stem": resolve_stem(m.stem, data.image_size)}
    return {
        "format": FORMAT,
        "dataset": data.name,
        "classes": list(data.classes),
        "multilabel": bool(data.multilabel),  # several classes an image: sigmoid outputs, not softmax
        "image_size": data.image_size,
        "channels": data.channels,
        # Model input: uint8 NHWC -> float in [0, 1] -> (x - mean) / std per channel (when given).
        "normalization": norm,
        "encoder": {"name": m.encoder, "feature_dim": m.feature_dim, "width": m.width, "blocks": m.blocks},
        "model": model,
        "preprocess": preprocess_for(data),
    }


MAX_CLASSES = 1 << 20


def check_model_info(info: Any, source: str) -> dict[str, Any]:
    """``info`` (a parsed model.json) with every key that inference reads checked: present, of its type,
    in range, lengths that agree (mean/std per channel, std above 0); ``UsageError`` naming ``source``
    and the key otherwise. A file edited by hand or written by another tool must fail here, in one
    line, not as a ``KeyError`` or NaN embeddings later."""
    if not isinstance(info, dict):
        raise UsageError(f"{source} is not a supcon model.json (not a JSON object)")
    field(info, "format", "int", source, choices=(FORMAT,))
    classes = field(info, "classes", "list", source)
    if not 1 <= len(classes) <= MAX_CLASSES:
        raise UsageError(f"{source}: classes must list 1 to {MAX_CLASSES} names, got {len(classes)}")
    for i, c in enumerate(classes):
        check_value(c, "str", f"{source}: classes[{i}]")
    field(info, "multilabel", "bool", source)
    size = field(info, "image_size", "int", source, ge=1, le=MAX_IMAGE_SIZE)
    channels = field(info, "channels", "int", source, choices=(1, 3))
    field(info, "dataset", "str", source, optional=True)
    norm = field(info, "normalization", "mapping", source, optional=True)
    if norm is not None:
        number_list(norm, "normalization.mean", source, channels)
        number_list(norm, "normalization.std", source, channels, gt=0)
    _check_preprocess(field(info, "preprocess", "mapping", source), size, source)
    cfg = from_dict({"model": field(info, "model", "mapping", source)}, source)
    # The rules that tie model fields together, and the weights' memory estimated before they are
    # built (one image a batch at inference).
    cfg.data.image_size, cfg.linear.batch_size = size, 1
    try:
        validate(cfg, ("linear",))
        ENCODERS.get(cfg.model.encoder)
    except UsageError as e:
        raise UsageError(f"{source}: {e}") from None
    return info


def _check_preprocess(pre: dict, size: int, source: str) -> None:
    resize = field(pre, "preprocess.resize", "str", source, choices=("square", "short-side"))
    field(pre, "preprocess.size", "int", source, choices=(size,))
    if resize == "short-side":
        field(pre, "preprocess.resize_to", "int", source, ge=size, le=4 * MAX_IMAGE_SIZE)


def write_model_info(run_dir: Path, cfg: Config, data: ImageDataset) -> None:
    """Write ``run_dir/model.json`` atomically (call on rank 0)."""
    text = json.dumps(model_info(cfg, data), indent=1)
    atomic_write(Path(run_dir) / MODEL_INFO, lambda tmp: Path(tmp).write_text(text))


def read_model_info(run_dir: Path, progress: bool = False) -> dict[str, Any]:
    """``run_dir/model.json``; for a run folder made before it existed, rebuilt from ``config.yaml`` and
    the run's dataset (loaded as training did), or a ``UsageError`` that says what is missing."""
    run_dir = Path(run_dir)
    path = run_dir / MODEL_INFO
    if path.exists():
        return check_model_info(load_json(read_text(path, MODEL_INFO), str(path)), str(path))
    from supcon.data.datasets import load_split

    if not run_dir.is_dir():
        raise UsageError(f"run folder does not exist: {run_dir}")
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"{run_dir} has neither {MODEL_INFO} nor config.yaml: not a supcon run folder")
    cfg = read_config_file(run_dir / "config.yaml")
    try:
        data, _ = load_split(cfg.data, cfg.seed, progress)
    except UsageError as e:
        raise UsageError(
            f"{run_dir} has no {MODEL_INFO} (an older run) and its dataset, needed to rebuild the class "
            f"names, image size and normalisation, cannot be loaded: {e}"
        ) from None
    return model_info(cfg, data)
