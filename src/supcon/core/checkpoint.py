"""Atomic checkpoints and weight files.

Every write goes to a temporary file in the same folder and is renamed into place, so a crash or
Ctrl-C mid-write never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import glob
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from supcon.core.errors import UsageError
from supcon.core.files import atomic_write, remove_stale_temps
from supcon.core.schema import field, number_list


def save_checkpoint(state: dict[str, Any], path: Path, keep: int = 2, *, locked: bool = False) -> None:
    """Save ``state`` atomically to ``path`` and keep the ``keep`` newest ``<stem>-e*.pt`` siblings.

    Temporary files that killed writers left beside ``path`` are removed; with ``locked`` (the caller
    holds the run folder's lock) all of them are.
    """
    remove_stale_temps(path.parent, "*.pt", all_dead=locked)
    # A full disk makes torch.save raise RuntimeError("[enforce fail at inline_container.cc] ...
    # unexpected pos"); atomic_write reports it as the file system error it is.
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    match = _EPOCH_FILE.match(path.name)
    if keep > 0 and match:
        for p in _checkpoints(path.parent, match["stem"])[:-keep]:
            p.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``; ``UsageError`` if it is missing or unreadable, naming an older one."""
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        # weights_only: a run folder may come from someone else, and a pickle can run any code on
        # load. Checkpoints hold only tensors, numbers, strings, lists and dicts (RNG states are byte
        # tensors, the lr schedule saves its fields as a dict), all of which the restricted
        # unpickler admits; anything else is refused, not executed.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(
            f"checkpoint {path} holds objects other than tensors and plain values "
            f"({_first_line(e)}); refusing to load it: supcon checkpoints never do"
        ) from None
    except Exception as e:  # truncated or corrupt file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = f"checkpoint {path} is unreadable ({type(e).__name__}" + (f": {reason})" if reason else ")")
        older = _older_checkpoint(path)
        if older is not None:
            msg += f"; an older one exists: {older.name}; delete {path.name} to resume from it"
        raise UsageError(msg) from None


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return text[0][:limit] if text else type(e).__name__


def check_checkpoint(ckpt: Any, path: Path, phase: str, epochs: int) -> None:
    """A loaded checkpoint's metadata, as :func:`supcon.train.loop.fit` reads it back: the keys present,
    of their types and in range (the phase it was saved for, an epoch within the phase's ``epochs``).
    ``UsageError`` naming the file and the key otherwise, never a ``KeyError`` deep in a resume."""
    source = f"checkpoint {path}"
    if not isinstance(ckpt, dict):
        raise UsageError(f"{source} is not a supcon checkpoint (not a mapping)")
    field(ckpt, "phase", "str", source, choices=(phase,))
    field(ckpt, "epoch", "int", source, ge=0, le=epochs)
    field(ckpt, "step", "int", source, ge=0, le=1 << 40)
    for key in ("model", "optimizer", "scheduler", "scaler", "config"):
        field(ckpt, key, "mapping", source)
    history = field(ckpt, "history", "list", source)
    if len(history) != ckpt["epoch"] or not all(isinstance(r, dict) for r in history):
        raise UsageError(f"{source}: history must hold one record (a mapping) per epoch done")
    if not isinstance(ckpt.get("g_data"), torch.Tensor) or ckpt["g_data"].dtype != torch.uint8:
        raise UsageError(f"{source}: g_data must be a generator state (a uint8 tensor)")
    field(ckpt, "streams", "list", source)
    partial = field(ckpt, "partial", "mapping", source, optional=True)
    if partial is not None:
        field(partial, "partial.loss", "number", source)
        field(partial, "partial.correct", "int", source, ge=0)
        field(partial, "partial.seen", "int", source, ge=0)
        field(partial, "partial.classifies", "bool", source)
        if field(partial, "partial.negatives", "list", source, optional=True) is not None:
            number_list(partial, "partial.negatives", source, 2)


def latest_checkpoint(folder: Path, stem: str) -> Path | None:
    """The most advanced ``<stem>-e<N>[.<step>].pt`` in ``folder`` (never a temporary file), or None."""
    found = _checkpoints(folder, stem)
    return found[-1] if found else None


def load_latest_checkpoint(folder: Path, stem: str) -> tuple[Path, dict[str, Any]] | None:
    """``(path, state)`` of ``latest_checkpoint``, or None if there is none.

    An unreadable newest checkpoint is a ``UsageError`` that names the next older one and how to
    resume from it, rather than a silent step back that would repeat epochs the log already has.
    """
    path = latest_checkpoint(folder, stem)
    return None if path is None else (path, load_checkpoint(path))


# <stem>-e<epochs done>.pt, or <stem>-e<epochs done>.<steps into the next epoch>.pt mid-epoch.
_EPOCH_FILE = re.compile(r"^(?P<stem>.+)-e(?P<epoch>\d+)(?:\.(?P<step>\d+))?\.pt$")


def _progress(m: re.Match) -> tuple[int, int]:
    return int(m["epoch"]), int(m["step"] or 0)


def _checkpoints(folder: Path, stem: str) -> list[Path]:
    """``<stem>-e<N>[.<step>].pt`` files in ``folder``, least progress first."""
    found = []
    for p in Path(folder).glob(f"{glob.escape(stem)}-e*.pt"):
        m = _EPOCH_FILE.match(p.name)
        if m and m["stem"] == stem and p.is_file():
            found.append((_progress(m), p))
    return [p for _, p in sorted(found)]


def _older_checkpoint(path: Path) -> Path | None:
    m = _EPOCH_FILE.match(path.name)
    if not m:
        return None
    older = [
        p for p in _checkpoints(path.parent, m["stem"]) if _progress(_EPOCH_FILE.match(p.name)) < _progress(m)
    ]
    return older[-1] if older else None


def save_weights(module: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Weights as safetensors (no pickle: safe to load from anywhere)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {}))


def load_weights(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise UsageError(f"weights not found: {path}")
    try:
        state = load_file(str(path))
    except Exception as e:
        raise UsageError(f"weights file {path} is unreadable ({e})") from None
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"weights {path} do not fit the model: {str(e).splitlines()[0]}") from None
    return module
