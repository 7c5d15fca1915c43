"""Checks of ``supcon_loss``'s arguments: each wrong input is refused with one message naming it
(type, shape, value), before any computation; the loss itself assumes checked inputs."""

from __future__ import annotations

import math

import torch

VARIANTS = ("out", "in", "npairs")
MULTILABEL_RULES = ("jaccard", "any")


def check_features(features) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got dtype {features.dtype}")
    if features.dim() == 2:
        features = features.unsqueeze(1)
    if features.dim() != 3:
        raise ValueError(
            "features must have shape [B, V, D] (V views of B samples) or [N, D] (one view each), "
            f"got shape {tuple(features.shape)}"
        )
    if features.shape[1] < 1 or features.shape[2] < 1:
        raise ValueError(
            f"features need at least one view and one dimension, got shape {tuple(features.shape)}"
        )
    return features


def check_temperature_tensor(t: torch.Tensor) -> float | None:
    """The value of a 0-d tensor temperature if it can be read without waiting for a device."""
    if t.dim() != 0 or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"temperature as a tensor must be a 0-d real tensor, got {t.dtype} {tuple(t.shape)}")
    return float(t.detach()) if t.device.type == "cpu" else None


def check_options(temperature, variant, chunk_size, base_temperature, multilabel=None) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(map(repr, VARIANTS))}")
    if multilabel is not None and multilabel not in MULTILABEL_RULES:
        raise ValueError(
            f"unknown multilabel rule {multilabel!r}; valid rules: {', '.join(map(repr, MULTILABEL_RULES))}"
        )
    checks = []
    if isinstance(temperature, torch.Tensor):
        value = check_temperature_tensor(temperature)
        if value is not None:  # a device tensor's value is not read: that would wait for the device
            checks.append(("temperature", value))
    else:
        checks.append(("temperature", temperature))
    if base_temperature is not None:
        checks.append(("base_temperature", base_temperature))
    for name, value in checks:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")


def check_labels(
    labels, batch: int, device: torch.device, multilabel: str | None = None
) -> tuple[str, torch.Tensor | None]:
    """The mode ("simclr", "labels", "mask" or "multi") and the labels on ``device``."""
    if multilabel is not None:
        return "multi", check_multi_hot(labels, batch, device, "labels", f"B = {batch} samples")
    if labels is None:
        return "simclr", None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    labels = labels.to(device)
    if labels.dim() == 1:
        if labels.shape[0] != batch:
            raise ValueError(
                f"labels has {labels.shape[0]} entries but features hold {batch} samples "
                "(labels are per sample, not per view)"
            )
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}; use labels.long()")
        return "labels", labels.long() if labels.dtype == torch.bool else labels
    if labels.dim() == 2:
        if labels.shape[0] != batch:
            raise ValueError(
                f"a positive mask must be [B, B] with B = {batch} samples, got shape {tuple(labels.shape)}"
            )
        return "mask", labels if labels.dtype == torch.bool else labels != 0
    raise ValueError(
        f"labels must be [B] class ids or a [B, B] positive mask, got shape {tuple(labels.shape)}"
    )


def check_multi_hot(hot, rows: int, device, name: str, what: str, classes: int | None = None):
    """Multi-hot labels ``[rows, C]`` as a bool tensor on ``device`` (non-zero entries are labels)."""
    if not isinstance(hot, torch.Tensor):
        raise TypeError(
            f"{name} must be a [{what.split()[0]}, C] multi-hot tensor with multilabel set, got "
            f"{type(hot).__name__}"
        )
    if hot.dim() != 2 or hot.shape[0] != rows or (classes is not None and hot.shape[1] != classes):
        want = "C" if classes is None else f"C = {classes}"
        raise ValueError(
            f"{name} must be multi-hot [{what.split()[0]}, C] with {what} and {want} labels when multilabel "
            f"is set, got shape {tuple(hot.shape)}"
        )
    return hot.to(device) != 0


def check_keys(keys, key_labels, mode: str, labels, dim: int, device, dtype):
    """The extra keys ``[M, D]`` (detached, in ``dtype``) and their labels, checked against the mode."""
    if keys is None:
        if key_labels is not None:
            raise ValueError("key_labels were given without keys")
        return None, None
    if not isinstance(keys, torch.Tensor) or not keys.is_floating_point():
        raise TypeError(f"keys must be a floating-point torch.Tensor [M, D], got {_describe(keys)}")
    if keys.dim() != 2 or keys.shape[1] != dim:
        raise ValueError(f"keys must be [M, D] with D = {dim} as the features, got shape {tuple(keys.shape)}")
    m = keys.shape[0]
    if mode == "mask":
        raise ValueError(
            "keys need class ids, multi-hot labels or None as labels: a [B, B] positive mask does not "
            "say which keys are positives"
        )
    if mode == "simclr":
        if key_labels is not None:
            raise ValueError(
                "key_labels need labels for the batch too: without labels every key is a negative"
            )
    elif key_labels is None:
        raise ValueError(f"keys need key_labels ([M] = [{m}] class ids, or [M, C] multi-hot with multilabel)")
    elif mode == "multi":
        key_labels = check_multi_hot(key_labels, m, device, "key_labels", f"M = {m} keys", labels.shape[1])
    else:
        if not isinstance(key_labels, torch.Tensor):
            raise TypeError(f"key_labels must be a torch.Tensor, got {type(key_labels).__name__}")
        if key_labels.shape != (m,):
            raise ValueError(
                f"key_labels must be [M] class ids with M = {m} keys, got shape {tuple(key_labels.shape)}"
            )
        if key_labels.is_floating_point() or key_labels.is_complex():
            raise TypeError(f"key_labels must be integer class ids, got dtype {key_labels.dtype}")
        key_labels = key_labels.to(device=device, dtype=labels.dtype)
    # Constants, as a memory queue's entries are: no gradient reaches them.
    return keys.detach().to(device=device, dtype=dtype), key_labels


def _describe(x) -> str:
    return f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
