"""supcon: supervised contrastive learning (Khosla et al. 2020) of image classifiers in PyTorch.

The loss is importable on its own (``from supcon import supcon_loss, SupConLoss``); the training
experiments are behind :func:`run` (the same as the ``supcon`` command) and a trained run folder
behind :func:`load` (embeddings and predictions), each imported on first use so that the loss alone
stays light.
"""

from supcon.loss import SupConLoss, supcon_loss

__version__ = "0.1.0"
__all__ = ["SupConLoss", "load", "run", "supcon_loss"]


def run(command: str = "compare", preset: str | None = None, out=None, **kwargs) -> dict:
    """Run a command of the command line (compare, train-ce, pretrain, linear, eval); see
    :func:`supcon.experiments.run`."""
    from supcon.experiments import run as _run

    return _run(command, preset, out, **kwargs)


def load(run_dir, device: str = "auto", **kwargs):
    """The trained models of a run folder as an object with ``embed``, ``predict`` and
    ``predict_proba``; see :func:`supcon.inference.load`."""
    from supcon.inference import load as _load

    return _load(run_dir, device, **kwargs)
