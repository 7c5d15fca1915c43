"""The command table: every command of ``supcon`` and :func:`supcon.run`, with what it needs.

Light on purpose (no torch): the command line builds ``--help`` and checks its arguments from here
before anything heavy is imported. A training command names the function that runs it
(``module:function``, imported when it runs); the tools that use a finished run name their module,
whose ``main(args)`` runs them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from supcon.core.config import PHASES


@dataclass(frozen=True)
class Command:
    help: str
    phases: tuple[str, ...]  # the phases its --epochs/--batch-size/--lr apply to
    target: str | None  # "module:function" taking (opened run, --from) -> results; None: eval
    trains: bool = True  # opens a run folder (False: reads one, --from)
    needs_from: bool = False  # --from DIR: a run folder to start from
    takes_from: bool = False  # --from DIR, optional

    def function(self) -> Callable:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


COMMANDS: dict[str, Command] = {
    "compare": Command(
        "the Keras example's two experiments: cross-entropy vs contrastive pre-training + classifier",
        PHASES,
        "supcon.experiments:compare",
    ),
    "train-ce": Command(
        "experiment 1 alone: encoder + classifier trained with cross-entropy",
        ("ce",),
        "supcon.experiments:train_ce_only",
    ),
    "pretrain": Command(
        "contrastive pre-training of the encoder (SupCon, or SimCLR with --method simclr)",
        ("pretrain",),
        "supcon.experiments:pretrain_only",
    ),
    "linear": Command(
        "classifier on the encoder of a pre-training run (--from DIR) or of a weights file (--pretrained "
        "FILE): frozen, or --finetune",
        ("linear",),
        "supcon.experiments:linear_only",
        takes_from=True,
    ),
    "eval": Command(
        "test accuracy (and kNN) of the models in a run folder, retrieval of its encoders (--from DIR)",
        (),
        None,
        trains=False,
        needs_from=True,
    ),
}

# Commands that read a finished run folder (--from DIR) and write files: no config, no run folder of
# their own. name -> (module whose main(args) runs it, help).
TOOLS: dict[str, tuple[str, str]] = {
    "embed": (
        "supcon.serve.embed",
        "embeddings of a dataset under a run's encoder, to .npz or .parquet (--from DIR)",
    ),
    "export": (
        "supcon.serve.export",
        "a run's model as TorchScript, ONNX or safetensors, taking uint8 images (--from DIR)",
    ),
}
