"""Typed configuration: dataclasses, YAML presets, strict loading and ``section.key=value`` overrides.

The resolved config is written into every run folder and checkpoint, so a resume rebuilds the
same model and a result can be traced to exactly what produced it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from supcon.errors import UsageError


@dataclass
class DataConfig:
    dataset: str | None = "digits"  # registry name; None with `path` = recognise the folder
    path: str | None = None
    image_size: int | None = None  # resize (image folders) / scale (digits)
    val_fraction: float = 0.0  # carved from train for monitoring/model selection; test is touched once
    normalize: bool = False  # standardise inputs with the training set's per-channel mean/std


@dataclass
class ModelConfig:
    encoder: str = "keras-cnn"
    feature_dim: int = 128  # output size of encoders that have a final dense layer (keras-cnn)
    width: int = 64  # base width of ResNets
    blocks: list[int] | None = None  # blocks per ResNet stage (None = the standard depth)
    projection: str = "none"  # none | linear | mlp: head used only by the contrastive loss
    projection_dim: int = 128
    projection_hidden: int | None = None
    projection_bn: bool = False
    classifier: str = "dropout-dense"  # dropout-dense (the seed's) | linear (a linear probe)
    classifier_hidden: int = 64
    dropout: float = 0.5


@dataclass
class LossConfig:
    method: str = "supcon"  # supcon (labels) | simclr (no labels)
    variant: str = "npairs"  # out | in | npairs
    temperature: float = 0.05
    chunk_size: int | None = None


@dataclass
class PhaseConfig:
    epochs: int = 50
    batch_size: int = 256
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    eps: float = 1e-7  # Keras' Adam epsilon
    schedule: str = "constant"  # constant | cosine | step
    warmup_epochs: float = 0.0
    scale_lr: bool = False  # lr * batch_size / 256
    augment: str = "none"  # none | supcon (crop, flip, colour jitter, grayscale) | crop-flip
    views: int = 1
    finetune: bool = False  # linear phase only: train the encoder too (full fine-tuning), not a probe


@dataclass
class Config:
    name: str = "keras-example"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast; the loss always runs in fp32)
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False  # BatchNorm over the global batch when training on several processes
    deterministic: bool = False
    knn_every: int = 0  # kNN monitor every N pre-training epochs (0 = off)
    knn_k: int = 200
    knn_temperature: float = 0.1
    keep_checkpoints: int = 2
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ce: PhaseConfig = field(default_factory=PhaseConfig)  # experiment 1: encoder + classifier, cross-entropy
    pretrain: PhaseConfig = field(default_factory=PhaseConfig)  # experiment 2a: contrastive pre-training
    linear: PhaseConfig = field(
        default_factory=PhaseConfig
    )  # experiment 2b: classifier on the frozen encoder

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


PHASES = ("ce", "pretrain", "linear")


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except UsageError:
                pass
        raise UsageError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UsageError(f"config key {key!r}: expected a list, got {value!r}")
        return [_check_type(v, inner, key) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise UsageError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise UsageError(
            f"config section {prefix.rstrip('.') or '(top)'!r}: expected a mapping, got {data!r}"
        )
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            raise UsageError(f"unknown config key {full!r}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _check_type(value, hints[key], full))


def from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _apply(cfg, data)
    return cfg


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("supcon.configs").iterdir() if p.name.endswith(".yaml")
    )


def load_preset(name_or_path: str) -> Config:
    """A preset by name (``src/supcon/configs/<name>.yaml``) or a YAML file path."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise UsageError(f"config file does not exist: {path}")
        text = path.read_text()
    else:
        res = resources.files("supcon.configs") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise UsageError(f"unknown preset {name_or_path!r}; choose one of: {', '.join(preset_names())}")
        text = res.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"config {name_or_path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(data)


def set_value(cfg: Config, assignment: str) -> None:
    """Apply one ``section.key=value`` override (value parsed as YAML: 0.5, true, null, [1, 1])."""
    if "=" not in assignment:
        raise UsageError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    set_values(cfg, {key.strip(): value})


def set_values(cfg: Config, overrides: dict[str, Any]) -> None:
    """Apply ``{"section.key": value}`` overrides (values already typed)."""
    for key, value in overrides.items():
        data: dict[str, Any] = {}
        node = data
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        _apply(cfg, data)


def validate(cfg: Config) -> None:
    """Reject nonsense values with one line naming the key."""
    for phase in PHASES:
        p: PhaseConfig = getattr(cfg, phase)
        if p.epochs < 1:
            raise UsageError(f"{phase}.epochs must be positive, got {p.epochs}")
        if p.batch_size < 1:
            raise UsageError(f"{phase}.batch_size must be positive, got {p.batch_size}")
        if p.lr <= 0:
            raise UsageError(f"{phase}.lr must be positive, got {p.lr}")
        if p.views < 1:
            raise UsageError(f"{phase}.views must be at least 1, got {p.views}")
        if p.augment not in ("none", "supcon", "crop-flip"):
            raise UsageError(f"{phase}.augment must be one of: crop-flip, none, supcon; got {p.augment!r}")
        if p.schedule not in ("constant", "cosine", "step"):
            raise UsageError(f"{phase}.schedule must be one of: constant, cosine, step; got {p.schedule!r}")
        if p.finetune and phase != "linear":
            raise UsageError(f"{phase}.finetune: only the linear phase fine-tunes (set linear.finetune)")
    if cfg.loss.temperature <= 0:
        raise UsageError(f"loss.temperature must be positive, got {cfg.loss.temperature}")
    if cfg.loss.method not in ("supcon", "simclr"):
        raise UsageError(f"loss.method must be one of: simclr, supcon; got {cfg.loss.method!r}")
    if cfg.loss.variant not in ("out", "in", "npairs"):
        raise UsageError(f"loss.variant must be one of: in, npairs, out; got {cfg.loss.variant!r}")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError(f"precision must be one of: auto, bf16, fp16, fp32; got {cfg.precision!r}")
    if not 0 <= cfg.data.val_fraction < 1:
        raise UsageError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.model.classifier not in ("dropout-dense", "linear"):
        raise UsageError(
            f"model.classifier must be one of: dropout-dense, linear; got {cfg.model.classifier!r}"
        )
    # Imported here, not at the top: the config module stays free of torch models.
    from supcon.encoders import ENCODERS
    from supcon.optim import OPTIMIZERS

    # Unknown names fail now, listing the valid ones, before any data is loaded.
    ENCODERS.get(cfg.model.encoder)
    for phase in PHASES:
        OPTIMIZERS.get(getattr(cfg, phase).optimizer)
    if cfg.model.projection not in ("none", "linear", "mlp"):
        raise UsageError(f"model.projection must be one of: linear, mlp, none; got {cfg.model.projection!r}")
