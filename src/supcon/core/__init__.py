"""The floor every other layer stands on: process and file plumbing with no knowledge of models,
data or training.

- ``errors``: :class:`~supcon.core.errors.UsageError`, the one-line error of bad input (exit 2);
- ``config``: the typed configuration, presets and ``--set`` overrides;
- ``dist``: the process group (torchrun) and its collectives; ``runtime``: device, precision and
  the process-wide settings (threads, allocator, cuDNN);
- ``files``: atomic writes and the cache folder; ``checkpoint``: checkpoints and weight files;
  ``runlog``: a run's ``metrics.jsonl``; ``registry``: name -> factory registries;
- ``stop``: SIGINT/SIGTERM turned into a flag the training loop checks.

May import: nothing of supcon outside ``core`` (checked by import-linter, ``pyproject.toml``).
"""
