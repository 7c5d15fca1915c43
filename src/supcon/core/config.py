"""Typed configuration: dataclasses, YAML presets, strict loading and ``section.key=value`` overrides.

The types say the valid values once: a ``Literal[...]`` lists the choices of a field, and a field's
``metadata`` its numeric range. Loading, ``--set``, validation and the command line's ``--help`` all
read them from here. The resolved config is written into every run folder and checkpoint, so a
resume rebuilds the same model and a result can be traced to exactly what produced it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from supcon.core.errors import UsageError
from supcon.core.schema import load_yaml, read_text, short

Augment = Literal["none", "supcon", "crop-flip"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Projection = Literal["none", "linear", "mlp"]
ClassifierKind = Literal["dropout-dense", "linear"]
Method = Literal["supcon", "simclr", "supcon+ce", "bcl"]
Variant = Literal["out", "in", "npairs"]
ScheduleName = Literal["constant", "cosine", "step"]
ImageStore = Literal["auto", "memory", "disk"]
Sampler = Literal["uniform", "class-balanced", "sqrt"]
Stem = Literal["auto", "cifar", "imagenet"]
MultiLabelRule = Literal["jaccard", "any"]


def choices(tp: Any) -> tuple[str, ...]:
    """The values a ``Literal`` type allows (for ``--help`` and argparse ``choices``)."""
    return typing.get_args(tp)


# Upper bounds: every numeric field gets one the machine can hold (no overflow in products such as
# steps * warmup_epochs or seed * a stream multiplier, no allocation of terabytes).
MAX_SEED = 2**32 - 1  # numpy's seed range; the stream seeds multiply it by < 2**14 (uint64 holds it)
MAX_IMAGE_SIZE = 4096
MAX_DIM = 1 << 16  # a layer's width
MAX_COUNT = 1 << 24  # epochs, batch sizes, queue lengths, chunk sizes
MAX_FACTOR = 1e6  # multipliers and weights of floats
MAX_TEXT = 4096  # a name or a path (PATH_MAX)


def _num(default: Any, *, ge: float | None = None, gt: float | None = None, lt: float | None = None,
         le: float | None = None):  # fmt: skip
    """A numeric field with its allowed range (``ge`` <= x, ``gt`` < x, x < ``lt``, x <= ``le``)."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "lt": lt, "le": le})


@dataclass
class DataConfig:
    dataset: str | None = "digits"  # registry name; None with `path` = recognise the folder
    path: str | None = None
    image_size: int | None = _num(None, ge=1, le=MAX_IMAGE_SIZE)  # resize (image folders) / scale (digits)
    val_fraction: float = _num(0.0, ge=0, lt=1)  # carved from train; the test set is touched once
    normalize: bool = False  # standardise inputs with the training set's per-channel mean/std
    # Image files: decoded into memory (square arrays) or an on-disk memory-mapped store (their own
    # aspect ratio; datasets larger than memory); auto = the store from 64 px on.
    store: ImageStore = "auto"
    test_fraction: float = _num(0.2, gt=0, lt=1)  # test share of image data given without a split
    # Long-tailed training set (supcon.data.longtail): max/min class count of the exponential profile;
    # None = as loaded (cifar10-lt / cifar100-lt: 100).
    imbalance: float | None = _num(None, ge=1, le=MAX_FACTOR)
    sampler: Sampler = "uniform"  # epoch order: a shuffle, or classes drawn equally / by sqrt(count)
    # Classes (names or ids) left out of training; evaluated as open-set retrieval.
    exclude_classes: list[str | int] | None = None


@dataclass
class ModelConfig:
    encoder: str = "keras-cnn"
    # Output size of encoders with a final dense layer (keras-cnn).
    feature_dim: int = _num(128, ge=1, le=MAX_DIM)
    width: int = _num(64, ge=1, le=4096)  # base width of ResNets
    blocks: list[int] | None = None  # blocks per ResNet stage (None = the standard depth)
    stem: Stem = "auto"  # ResNet stem; auto: imagenet (7x7 conv + max-pool) from 64 px, cifar below
    pretrained: str | None = None  # weights file the encoder starts from (.safetensors, .pth, .pt, .bin)
    projection: Projection = "none"  # head used only by the contrastive loss
    projection_dim: int = _num(128, ge=1, le=MAX_DIM)
    projection_hidden: int | None = _num(None, ge=1, le=MAX_DIM)
    projection_bn: bool = False
    classifier: ClassifierKind = "dropout-dense"  # the Keras example's head, or a linear probe
    classifier_hidden: int = _num(64, ge=1, le=MAX_DIM)
    dropout: float = _num(0.5, ge=0, lt=1)


@dataclass
class LossConfig:
    # supcon (labels) | simclr (no labels) | supcon+ce (SupCon plus a jointly trained linear classifier)
    # | bcl (long-tailed data, supcon.losses.bcl)
    method: Method = "supcon"
    variant: Variant = "npairs"
    temperature: float = _num(0.05, gt=0, le=MAX_FACTOR)
    chunk_size: int | None = _num(None, ge=1, le=MAX_COUNT)
    # Pre-training memory (supcon.train.extras): past batches' projections join every anchor's keys; 0 = off.
    queue_size: int = _num(0, ge=0, le=MAX_COUNT)
    # Keys from a momentum (EMA) copy of encoder + projection head, ema = m*ema + (1-m)*online after
    # each optimizer step (MoCo v2); None/0 = the online model's own detached projections (XBM).
    key_momentum: float | None = _num(None, ge=0, lt=1)
    ce_weight: float = _num(1.0, ge=0, le=MAX_FACTOR)  # supcon+ce: weight of the classifier's cross-entropy
    ce_detach: bool = True  # supcon+ce: the cross-entropy does not train the encoder (stop-gradient)
    # BCL: L = bcl_alpha * logit-adjusted CE + bcl_beta * L_BCL (the paper's CIFAR-LT weights).
    bcl_alpha: float = _num(2.0, ge=0, le=MAX_FACTOR)
    bcl_beta: float = _num(0.6, ge=0, le=MAX_FACTOR)
    # The prior's power in BCL's logit adjustment (0 = plain CE).
    logit_adjust_tau: float = _num(1.0, ge=0, le=MAX_FACTOR)
    # Multi-label data (a labels column): positives weighted by label-set overlap (jaccard) or any
    # shared label counted as a positive (any); see supcon.losses.supcon.
    multilabel: MultiLabelRule = "jaccard"


@dataclass
class PhaseConfig:
    epochs: int = _num(50, ge=1, le=MAX_COUNT)
    batch_size: int = _num(256, ge=1, le=MAX_COUNT)
    optimizer: str = "adam"
    lr: float = _num(1e-3, gt=0)  # any finite value: a huge one diverges, said in one line
    weight_decay: float = _num(0.0, ge=0, le=MAX_FACTOR)
    momentum: float = _num(0.9, ge=0, lt=1)
    eps: float = _num(1e-7, gt=0, le=1.0)  # Keras' Adam epsilon
    schedule: ScheduleName = "constant"
    warmup_epochs: float = _num(0.0, ge=0, le=MAX_COUNT)
    scale_lr: bool = False  # lr * batch_size / 256
    augment: Augment = "none"  # supcon: crop, flip, colour jitter, grayscale; crop-flip: the light one
    views: int = _num(1, ge=1, le=64)
    finetune: bool = False  # linear phase only: train the encoder too (full fine-tuning), not a probe
    # The encoder learns at lr * this, the heads at lr.
    backbone_lr_scale: float = _num(1.0, gt=0, le=MAX_FACTOR)
    freeze_bn: bool = False  # encoder BatchNorm: running statistics and affine parameters frozen
    freeze_stages: int = _num(0, ge=0, lt=6)  # ResNet: n > 0 freezes the stem and the first n-1 stages


@dataclass
class Config:
    name: str = "keras-example"
    seed: int = _num(0, ge=0, le=MAX_SEED)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = "auto"  # autocast; the loss always runs in fp32
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False  # BatchNorm over the global batch when training on several processes
    deterministic: bool = False
    # Process-wide CPU settings (supcon.core.runtime.tune_cpu); None: the command line turns them on,
    # the Python API leaves the process alone.
    tune_cpu: bool | None = None
    knn_every: int = _num(0, ge=0, le=MAX_COUNT)  # kNN monitor every N pre-training epochs (0 = off)
    knn_k: int = _num(200, ge=1, le=MAX_COUNT)
    knn_temperature: float = _num(0.1, gt=0, le=MAX_FACTOR)
    keep_checkpoints: int = _num(2, ge=0, le=MAX_COUNT)  # 0 keeps all
    # Epochs between checkpoints (the last epoch always saves).
    checkpoint_every: int = _num(1, ge=1, le=MAX_COUNT)
    tensorboard: bool = False  # per-epoch records also as TensorBoard scalars in RUN/tensorboard/
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ce: PhaseConfig = field(default_factory=PhaseConfig)  # experiment 1: encoder + classifier, cross-entropy
    pretrain: PhaseConfig = field(default_factory=PhaseConfig)  # experiment 2a: contrastive pre-training
    linear: PhaseConfig = field(default_factory=PhaseConfig)  # experiment 2b: classifier on the encoder

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


PHASES = ("ce", "pretrain", "linear")


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UsageError(f"{key} must be one of: {', '.join(map(str, choices(tp)))}; got {short(value)}")
        return value
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
        raise UsageError(f"config key {key!r}: expected {_type_name(tp)}, got {short(value)}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UsageError(f"config key {key!r}: expected a list, got {short(value)}")
        return [_check_type(v, inner, key) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 1e300:  # float() of a 400-digit integer overflows
            raise UsageError(f"config key {key!r}: {short(value, 40)} is too large")
        return float(value)
    if tp is str and isinstance(value, str) and len(value) > MAX_TEXT:
        raise UsageError(f"config key {key!r}: at most {MAX_TEXT} characters, got {len(value)}")
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads 1e-8 (no dot) as a string; a float field takes what float() takes.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise UsageError(f"config key {key!r}: expected {_type_name(tp)}, got {short(value)}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise UsageError(
            f"config section {prefix.rstrip('.') or '(top)'!r}: expected a mapping, got {short(data)}"
        )
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = prefix + short(key, 60).strip("'")
        if key not in names:
            raise UsageError(f"unknown config key {full!r}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _check_type(value, hints[key], full))


def from_dict(data: dict[str, Any], source: str | None = None) -> Config:
    """A config from a mapping (types checked). With ``source`` (a file read back), ranges are checked
    too and an error names the file."""
    cfg = Config()
    if source is None:
        _apply(cfg, data)
        return cfg
    try:
        _apply(cfg, data)
        _check_fields(cfg)
    except UsageError as e:
        raise UsageError(f"{source}: {e}") from None
    return cfg


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("supcon.configs").iterdir() if p.name.endswith(".yaml")
    )


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """A YAML mapping, parsed with bounded size, aliases and depth (:func:`supcon.core.schema.load_yaml`);
    a syntax error is one line naming ``source`` and the line and column."""
    data = load_yaml(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def read_config_file(path: Path) -> Config:
    """A config file read back (a run folder's ``config.yaml``): bounded YAML, types and ranges
    checked; ``UsageError`` naming the file and the key otherwise."""
    return from_dict(parse_yaml(read_text(path, "config"), str(path)), str(path))


def load_preset(name_or_path: str) -> Config:
    """A preset by name (``src/supcon/configs/<name>.yaml``) or a YAML file path."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.exists():
            raise UsageError(f"config file does not exist: {path}")
        text = read_text(path, "config file")
    else:
        res = resources.files("supcon.configs") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise UsageError(f"unknown preset {name_or_path!r}; choose one of: {', '.join(preset_names())}")
        text = res.read_text()
    return from_dict(parse_yaml(text, f"config {name_or_path}"))


def set_value(cfg: Config, assignment: str) -> None:
    """Apply one ``section.key=value`` override (value parsed as YAML: 0.5, true, null, [1, 1])."""
    if "=" not in assignment:
        raise UsageError(f"--set expects key=value, got {short(assignment)}")
    key, raw = assignment.split("=", 1)
    try:
        value = load_yaml(raw, f"--set {short(key, 60)}")
    except UsageError:
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


def _check_fields(obj: Any, prefix: str = "") -> None:
    """Every field's type (values set in Python skip the loading checks) and numeric range."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_fields(value, key + ".")
            continue
        _check_type(value, hints[f.name], key)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{key} must be a finite number, got {value}")
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        _check_range(key, value, f.metadata)


def _bound(x: float) -> str:
    return f"{int(x):_}" if float(x).is_integer() and abs(x) >= 1e5 else f"{x:g}"


def _check_range(key: str, value: float, meta: Any) -> None:
    ge, gt, lt, le = (meta.get(k) for k in ("ge", "gt", "lt", "le"))
    shown = short(value, 40)  # a 10**30 seed or 1e308 is printed cut, never in full
    if ge is not None and value < ge:
        raise UsageError(f"{key} must be at least {_bound(ge)}, got {shown}")
    if gt is not None and not value > gt:
        raise UsageError(f"{key} must be greater than {_bound(gt)}, got {shown}")
    if lt is not None and not value < lt:
        raise UsageError(f"{key} must be below {_bound(lt)}, got {shown}")
    if le is not None and not value <= le:
        raise UsageError(f"{key} must be at most {_bound(le)}, got {shown}")


def memory_needed(cfg: Config, phases: tuple[str, ...] = PHASES) -> dict[str, int]:
    """A lower bound of the bytes a run of ``cfg`` allocates, by part, from its sizes alone (no torch):
    the dense layers' weights with gradients and two Adam moments, the memory queue, one float batch
    of every phase. It catches sizes that ask for terabytes before anything is allocated."""
    m, size = cfg.model, cfg.data.image_size or 32
    s2 = max(1, ((size - 2) // 2 - 2) // 2)
    hidden = m.projection_hidden or m.feature_dim
    dense = m.feature_dim * (hidden + m.classifier_hidden) + hidden * m.projection_dim
    if m.encoder == "keras-cnn":
        dense += 64 * s2 * s2 * m.feature_dim
    elif m.encoder.startswith("resnet"):
        dense += 11_000_000 * (m.width / 64) ** 2 * max(1.0, sum(m.blocks or [2, 2, 2, 2]) / 8)
    batch = max(getattr(cfg, p).batch_size * getattr(cfg, p).views for p in phases) * size * size * 3
    return {
        "weights": int(dense) * 4 * 4,
        "queue": cfg.loss.queue_size * max(m.projection_dim, m.feature_dim) * 4
        if "pretrain" in phases
        else 0,
        "batch": batch * 4,
    }


def check_memory(cfg: Config, phases: tuple[str, ...] = PHASES) -> None:
    """``UsageError`` when :func:`memory_needed` exceeds the machine's physical memory."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no estimate to compare against
        return
    need = memory_needed(cfg, phases)
    if sum(need.values()) > total:
        parts = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in need.items() if v)
        raise UsageError(
            f"the model and batch sizes need at least {sum(need.values()) / 2**30:.1f} GiB ({parts}); "
            f"this machine has {total / 2**30:.1f} GiB: lower model.feature_dim, loss.queue_size, the "
            "batch size, views or the image size"
        )


def validate(cfg: Config, phases: tuple[str, ...] = PHASES) -> None:
    """Reject nonsense values with one line naming the key: types and ranges from the field
    definitions, then the rules that tie fields together, for the ``phases`` a command runs. Names
    looked up in the registries of higher layers (encoders, optimizers) are checked when a run opens
    (:func:`supcon.runs.open.check_names`)."""
    _check_fields(cfg)
    for phase in PHASES:
        if getattr(cfg, phase).finetune and phase != "linear":
            raise UsageError(f"{phase}.finetune: only the linear phase fine-tunes (set linear.finetune)")
    lin = cfg.linear
    if not lin.finetune and (lin.backbone_lr_scale != 1.0 or lin.freeze_bn or lin.freeze_stages):
        raise UsageError(
            "linear.backbone_lr_scale/freeze_bn/freeze_stages apply when the encoder trains; the linear "
            "probe freezes all of it (set linear.finetune to fine-tune)"
        )
    pre = cfg.pretrain
    if "pretrain" in phases and pre.views == 1 and (cfg.loss.method == "simclr" or pre.batch_size == 1):
        why = "SimCLR's positives are other views" if cfg.loss.method == "simclr" else "batch_size 1"
        raise UsageError(
            f"pretrain with views=1 and {why}: no anchor ever has a positive, so the loss teaches "
            "nothing; use pretrain.views >= 2 (with augmentation) or a larger batch"
        )
    if cfg.loss.key_momentum and not cfg.loss.queue_size:
        raise UsageError("loss.key_momentum: the momentum encoder fills the queue; set loss.queue_size > 0")
    if cfg.loss.queue_size and cfg.loss.method == "bcl":
        raise UsageError("loss.queue_size: the memory queue is for supcon, simclr and supcon+ce, not bcl")
    if cfg.model.blocks is not None and (not 1 <= len(cfg.model.blocks) <= 4 or min(cfg.model.blocks) < 1):
        raise UsageError(
            f"model.blocks must be 1 to 4 positive counts per stage, got {short(cfg.model.blocks)}"
        )
    if cfg.model.blocks is not None and max(cfg.model.blocks) > 256:
        raise UsageError(f"model.blocks: at most 256 blocks per stage, got {short(cfg.model.blocks)}")
    check_memory(cfg, phases)
    from supcon.core.runtime import check_device_name  # here: loading a config needs no torch

    check_device_name(cfg.device)
