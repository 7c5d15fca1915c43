"""supcon: supervised contrastive learning (Khosla et al. 2020) of image classifiers in PyTorch.

The public API, each name imported on first use so that ``import supcon`` stays light:

- :func:`supcon_loss` and :class:`SupConLoss` (:mod:`supcon.losses.supcon`);
- :func:`run`: any command of the command line (:func:`supcon.driver.run`);
- :func:`load`: a trained run folder's models, with ``embed``, ``predict`` and ``predict_proba``
  (:func:`supcon.serve.inference.load`);
- :class:`UsageError`: what bad input raises (:mod:`supcon.core.errors`).

The package's layers, top to bottom: ``cli``, ``driver``, ``commands``, ``experiments``, ``serve``, ``runs``,
``train``, ``evaluation``, ``models`` and ``losses``, ``data``, ``core`` (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["SupConLoss", "UsageError", "load", "run", "supcon_loss"]

_LAZY = {
    "supcon_loss": "supcon.losses.supcon",
    "SupConLoss": "supcon.losses.supcon",
    "UsageError": "supcon.core.errors",
}

if TYPE_CHECKING:
    from supcon.core.errors import UsageError
    from supcon.losses.supcon import SupConLoss, supcon_loss


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'supcon' has no attribute {name!r}")


def run(command: str = "compare", preset: str | None = None, out=None, **kwargs) -> dict:
    """Run a command of the command line (compare, train-ce, pretrain, linear, eval); see
    :func:`supcon.driver.run`."""
    from supcon.driver import run as _run

    return _run(command, preset, out, **kwargs)


def load(run_dir, device: str = "auto", **kwargs):
    """The trained models of a run folder as an object with ``embed``, ``predict`` and
    ``predict_proba``; see :func:`supcon.serve.inference.load`."""
    from supcon.serve.inference import load as _load

    return _load(run_dir, device, **kwargs)
