"""Opening a run: validate the config, lock and prepare the run folder, resolve the runtime."""

from __future__ import annotations

from pathlib import Path

from supcon.core import dist
from supcon.core.config import PHASES, Config, validate
from supcon.core.errors import UsageError
from supcon.core.files import atomic_write
from supcon.core.runlog import summary_writer_class
from supcon.core.runtime import resolve_runtime, seed_everything, tune_cpu
from supcon.models.encoders import ENCODERS
from supcon.runs.folder import check_resume_command, check_run_dir, config_diff, read_config, write_run_info
from supcon.train.context import Run
from supcon.train.optim import OPTIMIZERS


def check_names(cfg: Config) -> None:
    """Registry names of ``cfg`` (the encoder, each phase's optimizer): an unknown one fails now, listing
    the valid ones, before any data is loaded."""
    ENCODERS.get(cfg.model.encoder)
    for phase in PHASES:
        OPTIMIZERS.get(getattr(cfg, phase).optimizer)


def _lock(run_dir: Path):
    """Rank 0 holds the run folder's lock for the life of the run: one writer per folder."""
    from supcon.runs.lock import RunLock

    return RunLock(run_dir).acquire() if dist.is_main() else None


def _write_start(cfg: Config, run_dir: Path, resume: bool, command: str | None) -> None:
    """Rank 0: clear the folder (a fresh or overwritten run), write the resolved config and which
    command made it."""
    from supcon.runs.lock import clear_run_folder

    if resume:
        return
    clear_run_folder(run_dir)
    text = cfg.to_yaml()
    atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    if command is not None:
        write_run_info(run_dir, command)


def open_run(
    cfg: Config,
    run_dir: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    stop_after: int | None = None,
    phases: tuple[str, ...] = PHASES,
    command: str | None = None,
) -> Run:
    """Validate, lock and prepare the run folder (rank 0), resolve the runtime. ``device`` overrides
    ``cfg.device`` for this process only (each rank's own GPU); it is not part of the saved config."""
    validate(cfg, phases)
    check_names(cfg)
    if cfg.tensorboard and dist.is_main():
        summary_writer_class()  # missing tensorboard fails now, not after the first epoch
    rt = resolve_runtime(device or cfg.device, cfg.precision, cfg.channels_last, cfg.deterministic)
    lock = _lock(run_dir)
    try:
        check_run_dir(run_dir, overwrite, resume)
        if resume and command is not None:
            check_resume_command(run_dir, command, phases)
        if resume:
            diff = config_diff(read_config(run_dir).to_dict(), cfg.to_dict())
            if diff:
                raise UsageError(f"cannot resume {run_dir}: the config differs in {'; '.join(diff)}")
        dist.barrier()  # every rank has looked at the folder before rank 0 writes into it
        if dist.is_main():
            _write_start(cfg, run_dir, resume, command)
        dist.barrier()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    seed_everything(cfg.seed, cfg.deterministic)
    if cfg.tune_cpu and rt.device.type == "cpu":
        tune_cpu()
    return Run(cfg, rt, run_dir, resume=resume, progress=progress, stop_after=stop_after, lock=lock)
