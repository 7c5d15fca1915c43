"""Atomic checkpoints and weight files.

Every write goes to a temporary file in the same folder and is renamed into place, so a crash or
Ctrl-C mid-write never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from supcon.errors import UsageError
from supcon.files import atomic_write


def save_checkpoint(state: dict[str, Any], path: Path, keep: int = 2) -> None:
    """Save ``state`` atomically to ``path`` and keep the ``keep`` newest ``<stem>-e*.pt`` siblings."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    if keep > 0 and "-e" in path.stem:
        stem = path.stem.rsplit("-e", 1)[0]
        old = sorted(path.parent.glob(f"{stem}-e*.pt"), key=lambda p: p.stat().st_mtime)
        for p in old[:-keep]:
            p.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        # Checkpoints hold RNG states and optimizer state besides tensors; they are our own files.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or corrupt file
        raise UsageError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None


def latest_checkpoint(folder: Path, stem: str) -> Path | None:
    found = sorted(folder.glob(f"{stem}-e*.pt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


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
