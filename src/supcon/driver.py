"""One driver for every command, from the command line and from Python.

A :class:`Request` says what to run: the command, where its config comes from (a preset, the saved
config on resume, the ``--from`` run's for ``linear``), the overrides, the run folder and how to
drive it. :func:`execute` resolves the config, repeats over seeds when asked, opens the run folder
and dispatches through :data:`supcon.commands.COMMANDS`. ``supcon`` (:mod:`supcon.cli`) builds a
request from its arguments, :func:`run` from its keywords: the two paths are one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supcon.commands import COMMANDS
from supcon.core.config import Config, load_preset, set_value, set_values
from supcon.core.errors import UsageError
from supcon.core.schema import short
from supcon.core.stop import StopFlag
from supcon.experiments import evaluate_folder, report_failure
from supcon.runs.folder import check_inputs_outside, default_run_dir, read_config
from supcon.runs.open import open_run
from supcon.runs.seeds import fresh_seed_preset, run_seeds, seed_dir, seed_source
from supcon.train.loop import Diverged


@dataclass
class Request:
    """A command to run and how. ``overrides`` (dotted config keys, typed values) apply to the base
    config first, then ``assignments`` (``key=value`` text, as ``--set``), then ``seed``."""

    command: str = "compare"
    preset: str | None = None
    out: Path | None = None
    from_dir: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    assignments: list[str] = field(default_factory=list)
    seed: int | None = None
    seeds: list[int] | None = None  # repeat in out/seed-N, then aggregate (supcon.runs.seeds)
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    stop_after: int | None = None
    # This process's device, not saved in the config (each torchrun rank's own GPU); for eval, the
    # device to evaluate on.
    device: str | None = None
    tune_cpu: bool = False  # config.tune_cpu when the config leaves it unset (the command line: True)
    on_result: Callable[[Request, dict], None] | None = None  # after each run (the CLI prints a table)


def base_config(command: str, preset: str | None, resume_dir: Path | None, from_dir: Path | None) -> Config:
    """Where a command's config starts: the saved one on resume (or ``preset``, which must then give
    the same config), a ``linear`` run's ``from_dir``, else ``preset`` (default keras-example)."""
    if from_dir is not None and command == "linear":
        if preset is not None:
            raise UsageError("--preset cannot be combined with --from: the config comes from that run")
        if resume_dir is None:
            return read_config(from_dir)
    if resume_dir is not None and preset is None:
        return read_config(resume_dir)
    return load_preset(preset or "keras-example")


def resolve_config(req: Request) -> Config:
    """The config of a single run: base config, then overrides, assignments and the seed."""
    cfg = base_config(req.command, req.preset, req.out if req.resume else None, req.from_dir)
    set_values(cfg, req.overrides)
    for assignment in req.assignments:
        set_value(cfg, assignment)
    if req.seed is not None:
        set_values(cfg, {"seed": req.seed})
    if cfg.tune_cpu is None:
        cfg.tune_cpu = req.tune_cpu
    return cfg


def for_seed(req: Request, seed: int, folder: Path | None = None, resume: bool | None = None) -> Request:
    """One seed's run of a repeat: its own folder (``out/seed-N``), seed and ``--from``."""
    folder = folder or seed_dir(req.out, seed)
    if resume is None:
        resume = req.resume and (folder / "config.yaml").is_file()
    from_dir = seed_source(req.from_dir, seed)
    return dataclasses.replace(req, out=folder, resume=resume, seed=seed, seeds=None, from_dir=from_dir)


def check(req: Request) -> Request:
    """``req`` with its command checked and its run folder decided."""
    if req.command not in COMMANDS:
        raise UsageError(f"unknown command {short(req.command)}; choose one of: {', '.join(COMMANDS)}")
    spec = COMMANDS[req.command]
    if spec.needs_from and req.from_dir is None:
        raise UsageError(f"{req.command} needs --from DIR (a finished run folder)")
    if spec.trains and req.out is None:
        if req.resume:
            raise UsageError("--resume needs --out DIR (the run folder to continue)")
        req = dataclasses.replace(req, out=default_run_dir(req.command))
    return req


def execute(req: Request) -> dict:
    """Run the request; returns its results (also in ``out/results.json``).

    A stop request (SIGINT/SIGTERM, ``stop_after``) ends it with :class:`supcon.core.stop.Interrupted`
    after the checkpoint is saved; ``resume=True`` continues it.
    """
    req = check(req)
    if not COMMANDS[req.command].trains:
        return evaluate_folder(req.from_dir, req.device or "auto")
    if req.seeds is not None:
        return _execute_seeds(req)
    return _execute_one(req, resolve_config(req))


def _execute_one(req: Request, cfg: Config, stop: StopFlag | None = None) -> dict:
    if req.overwrite and not req.resume:
        inputs = {"--from": req.from_dir, "--pretrained": cfg.model.pretrained, "--data": cfg.data.path}
        check_inputs_outside(req.out, inputs)
    handle = open_run(
        cfg, req.out, overwrite=req.overwrite, resume=req.resume, progress=req.progress,
        device=req.device, stop_after=req.stop_after, phases=COMMANDS[req.command].phases,
        command=req.command,
    )  # fmt: skip
    if stop is not None:
        handle.stop = stop  # a repeat over seeds: one stop request for the whole job
    try:
        with handle.stop:
            results = COMMANDS[req.command].function()(handle, req.from_dir)
    except Diverged as e:
        report_failure(handle, req.command, str(e))
        raise
    finally:
        handle.close()
    if req.on_result is not None:
        req.on_result(req, results)
    return results


def _execute_seeds(req: Request) -> dict:
    stop = StopFlag()  # held across seeds: a SIGTERM between two runs still ends the job

    def one(seed: int, folder: Path, again: bool) -> dict:
        sub = for_seed(req, seed, folder, again)
        if req.resume and not again:  # a seed not started yet: the started ones' config
            sub.preset = fresh_seed_preset(req.command, req.out, req.preset)
        return _execute_one(sub, resolve_config(sub), stop)

    with stop:
        return run_seeds(req.command, req.seeds, req.out, one, resume=req.resume, stop=stop)


def run(
    command: str = "compare",
    preset: str | None = None,
    out: str | Path | None = None,
    *,
    overrides: dict | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    from_dir: str | Path | None = None,
    device: str = "auto",
    seeds: list[int] | None = None,
) -> dict:
    """Any command of the command line from Python. ``overrides`` maps dotted keys to values::

        run("compare", "keras-example", "runs/demo",
            overrides={"data.dataset": "digits", "ce.epochs": 5, "pretrain.epochs": 5, "linear.epochs": 5})
        run("eval", from_dir="runs/demo")

    The config starts from ``preset`` (default keras-example), or for ``linear`` from the config of
    the ``from_dir`` run, or on ``resume`` from the saved one. ``device`` other than ``auto`` sets
    ``config.device`` (for ``eval``: the device to evaluate on). Returns the results dict (also
    written to ``<out>/results.json``); ``eval`` returns :func:`supcon.experiments.evaluate_folder`'s
    dict. ``seeds=[0, 1, 2]`` repeats the command in ``<out>/seed-N`` and aggregates
    (:mod:`supcon.runs.seeds`). Process-wide CPU settings (:func:`supcon.core.runtime.tune_cpu`)
    apply only with ``overrides={"tune_cpu": True}``.
    """
    overrides = dict(overrides or {})
    trains = command not in COMMANDS or COMMANDS[command].trains
    if trains and device != "auto":
        overrides["device"] = device
    req = Request(
        command, preset, Path(out) if out is not None else None,
        Path(from_dir) if from_dir is not None else None, overrides, seeds=seeds, overwrite=overwrite,
        resume=resume, progress=progress, device=None if trains else device,
    )  # fmt: skip
    return execute(req)
