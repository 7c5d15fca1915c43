"""A backbone's weights from a file: the encoder a run starts from (``model.pretrained``).

Files: ``.safetensors`` (no code in the format) and ``.pth``/``.pt``/``.bin`` read with
``torch.load(weights_only=True)``, which refuses any pickle that would run code: a downloaded
checkpoint is never unpickled freely. The usual wrappings are undone: a dict under ``state_dict``,
``model`` or ``encoder``; key prefixes ``module.`` (DistributedDataParallel), ``encoder.``,
``backbone.``, ``model.`` (a supcon run's ``weights/*.safetensors`` and most training scripts); the
CIFAR ResNets' ``shortcut`` and torchvision's ``downsample`` name the same layers. Classifier keys
(``fc``, ``head``, ``classifier``) that the encoder lacks are dropped.

Loading is by name and shape: tensors whose name the encoder lacks, or that the file lacks, are listed
in one summary line; a file that matches nothing, or whose shapes differ, is refused (another
architecture), so a run never starts silently from random weights believed to be pre-trained.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from supcon.core.errors import UsageError

WRAPPERS = ("state_dict", "model", "encoder")
PREFIXES = ("module.", "encoder.", "backbone.", "model.")
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.")
# The same layer's name in the CIFAR ResNets and in torchvision/timm ResNets.
RENAMES = ((".shortcut.", ".downsample."), (".downsample.", ".shortcut."))
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SHOW = 5  # names listed in a message


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped from ``state_dict``/``model``/``encoder`` dicts."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"pretrained weights {path} is a folder; give the weights file inside it")
    if not path.exists():
        raise UsageError(f"pretrained weights not found: {path}")
    if not path.is_file():  # a FIFO would block the read, a device never ends
        raise UsageError(f"pretrained weights {path} is not a regular file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise UsageError(f"pretrained weights {path} are unreadable as safetensors ({e})") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise UsageError(
            f"pretrained weights {path}: unknown file type {path.suffix!r}; "
            f"use .safetensors or one of {', '.join(TORCH_SUFFIXES)}"
        )
    try:
        # weights_only: tensors and plain containers only; a pickle that would import or run code fails.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"pretrained weights {path} hold more than tensors and are refused (torch.load with "
            f"weights_only=True: {first}); save a plain state_dict or .safetensors instead"
        ) from None
    except Exception as e:
        raise UsageError(f"pretrained weights {path} are unreadable ({type(e).__name__}: {e})") from None
    return _unwrap(obj, path)


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}
        if isinstance(obj, dict) and not _has_tensors(obj):
            inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not _has_tensors(obj):
        raise UsageError(f"pretrained weights {path}: no tensors found (expected a state_dict)")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _has_tensors(d: dict) -> bool:
    return any(isinstance(v, torch.Tensor) for v in d.values())


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, without it (a wrapper's other parts, e.g. a projection head, go)."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _rename(state: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {k.replace(old, new): v for k, v in state.items()}


def match_names(state: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    """``state`` with wrapper prefixes and layer renames undone: of every way to undo up to
    ``_DEPTH`` of them (``module.encoder.`` is two), the one with most names in ``names`` (the
    encoder's), the fewest steps on a tie: a model whose own layer is called ``model`` keeps it."""

    def hits(s: dict) -> int:
        return sum(k in names for k in s)

    best, frontier = state, [state]
    for _ in range(_DEPTH):
        nxt = []
        for s in frontier:
            nxt += [_strip(s, p) for p in PREFIXES if any(k.startswith(p) for k in s)]
            nxt += [_rename(s, a, b) for a, b in RENAMES if any(a in k for k in s)]
        for s in nxt:
            if hits(s) > hits(best):
                best = s
        frontier = nxt
    return best


_DEPTH = 3


@dataclass
class LoadReport:
    path: Path
    loaded: list[str]
    missing: list[str]  # the encoder's, not in the file: they keep their initial values
    unexpected: list[str]  # the file's, not in the encoder: ignored
    dropped: list[str] = field(default_factory=list)  # classifier keys left out

    def summary(self) -> str:
        line = f"pretrained: loaded {len(self.loaded)} encoder tensors from {self.path}"
        if self.missing:
            line += f"; missing {len(self.missing)} (kept initial): {_names(self.missing)}"
        if self.unexpected:
            line += f"; unexpected {len(self.unexpected)} (ignored): {_names(self.unexpected)}"
        if self.dropped:
            line += f"; dropped {len(self.dropped)} classifier tensors"
        return line


def _names(keys: list[str]) -> str:
    more = f", ... (+{len(keys) - SHOW})" if len(keys) > SHOW else ""
    return ", ".join(keys[:SHOW]) + more


def load_pretrained(encoder: nn.Module, path: str | Path, verbose: bool = True) -> LoadReport:
    """Load ``path`` into ``encoder`` by name (see the module docstring); prints one summary line
    with ``verbose``. ``UsageError`` when nothing matches or a shape differs."""
    path = Path(path)
    # A wrapper (the timm encoder) names the module whose keys the checkpoints use.
    target = getattr(encoder, "weights_module", encoder)
    own = target.state_dict()
    state = match_names(read_tensors(path), set(own))
    dropped = [k for k in state if k not in own and k.startswith(CLASSIFIER_PREFIXES)]
    state = {k: v for k, v in state.items() if k not in dropped}
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        shown = "; ".join(f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in wrong[:SHOW])
        raise UsageError(
            f"pretrained weights {path} do not fit this encoder: {len(wrong)} shapes differ "
            f"(file vs encoder: {shown}); likely another architecture (encoder, stem, width, "
            "blocks or input channels)"
        )
    loaded = [k for k in own if k in state]
    if not loaded:
        raise UsageError(
            f"pretrained weights {path}: none of its {len(state)} tensor names match this encoder "
            f"(file: {_names(list(state))}; encoder: {_names(list(own))}); likely another architecture"
        )
    bad = [k for k in loaded if state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    if bad:  # else training would start from them and report a divergence, blaming the wrong thing
        raise UsageError(
            f"pretrained weights {path} hold NaN or infinite values ({len(bad)} tensors: {_names(bad)})"
        )
    target.load_state_dict({k: state[k] for k in loaded}, strict=False)
    report = LoadReport(
        path,
        loaded,
        # BatchNorm's step counters are no weights; older checkpoints lack them.
        missing=[k for k in own if k not in state and not k.endswith("num_batches_tracked")],
        unexpected=[k for k in state if k not in own],
        dropped=dropped,
    )
    if verbose:
        print(report.summary(), flush=True)
    return report
