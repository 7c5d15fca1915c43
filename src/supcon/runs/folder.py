"""Run folders on disk: where a run goes, whether a folder may be reused, and its config read back.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON line per
epoch), ``results.json``, ``weights/``, ``checkpoints/``, ``report.md`` and plots. While a run
writes into it, the folder is locked (``supcon.runs.lock``): a second writer is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from supcon.core.config import Config, read_config_file
from supcon.core.errors import UsageError
from supcon.core.files import atomic_write
from supcon.core.schema import field, load_json, read_text, short

# Files a start writes before any training: a folder holding only these is a failed start's stub.
_STUB_FILES = {"config.yaml", ".lock", "views.png", "model.json", "run.json"}
# Everything else a run writes at the top of its folder (plots are *.png; atomic writes' temporaries
# are .<name>.<pid>.<random>.tmp). A folder holding anything else is not only a run folder.
_RUN_FILES = {"results.json", "report.md", "metrics.jsonl"}
_RUN_FOLDERS = {"weights", "checkpoints", "tensorboard", "export"}
RUN_INFO = "run.json"  # which command made the folder: --resume checks it


def default_run_dir(command: str) -> Path:
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def read_config(run_dir: Path) -> Config:
    """The resolved config a run folder was made with, checked as any file read back (bounded YAML,
    types and ranges); ``UsageError`` naming the file and key otherwise."""
    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise UsageError(f"run folder does not exist: {run_dir}")
    if not path.exists():
        raise UsageError(f"{run_dir} is not a supcon run folder (no config.yaml)")
    return read_config_file(path)


def config_diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {short(a, 60)} (saved) vs {short(b, 60)} (now)")
    return out


def _is_stub(run_dir: Path) -> bool:
    """Only what a start writes before training (a start that failed, e.g. on bad data)."""
    return all(p.name in _STUB_FILES for p in run_dir.iterdir())


def _foreign_entries(run_dir: Path) -> list[str]:
    """Names in ``run_dir`` that no supcon run writes (or written with another type)."""
    odd = []
    for p in run_dir.iterdir():
        name = p.name
        if p.is_symlink():
            odd.append(name)
        elif name in _RUN_FOLDERS:
            odd += [f"{name}/{n}" for n in _foreign_inside(p)] if p.is_dir() else [name]
        elif name in _STUB_FILES or name in _RUN_FILES or name.endswith(".png"):
            odd += [] if p.is_file() else [name]
        elif not (name.startswith(".") and name.endswith(".tmp")):
            odd.append(name)
    return sorted(odd)


# What the run's own subfolders hold (tensorboard/ and export/ hold what those tools name).
_INSIDE = {"weights": (".safetensors",), "checkpoints": (".pt",)}


def _foreign_inside(folder: Path) -> list[str]:
    suffixes = _INSIDE.get(folder.name)
    if suffixes is None:
        return []
    return [
        p.name
        for p in folder.iterdir()
        if p.is_symlink() or not p.is_file() or not (p.name.endswith(suffixes) or p.name.endswith(".tmp"))
    ]


def recognise_run_folder(run_dir: Path) -> None:
    """``UsageError`` unless ``run_dir`` is recognisably a supcon run folder: its ``config.yaml`` reads
    back as a supcon config, its ``model.json`` (if any) as a supcon model.json, and it holds nothing
    a run does not write. Checked before a folder is replaced: anything else is someone's data."""
    from supcon.runs.modelinfo import MODEL_INFO, check_model_info

    why = "refusing to replace"
    odd = _foreign_entries(run_dir)
    if odd:
        names = ", ".join(short(n, 40) for n in odd[:5]) + (
            f" and {len(odd) - 5} more" if len(odd) > 5 else ""
        )
        raise UsageError(
            f"{why} {run_dir}: not a supcon run folder (it holds {names}, which no supcon run writes)"
        )
    if not (run_dir / "config.yaml").exists():
        raise UsageError(f"{why} {run_dir}: it is not a supcon run folder (no config.yaml)")
    try:
        read_config(run_dir)
        if (run_dir / MODEL_INFO).exists():
            check_model_info(load_json(read_text(run_dir / MODEL_INFO, MODEL_INFO), MODEL_INFO), MODEL_INFO)
        if (run_dir / RUN_INFO).exists():
            field(load_json(read_text(run_dir / RUN_INFO, RUN_INFO), RUN_INFO), "command", "str", RUN_INFO)
    except UsageError as e:
        raise UsageError(f"{why} {run_dir}: not a supcon run folder ({e})") from None


def check_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to reuse a non-empty run folder unless asked; never delete a folder that isn't
    recognisably a run folder (:func:`recognise_run_folder`), not even a failed start's stub."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} exists and is not a folder")
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"nothing to resume in {run_dir}: it has no config.yaml")
        return
    if not run_dir.is_dir() or not any(p.name != ".lock" for p in run_dir.iterdir()):
        return
    if not overwrite and not _is_stub(run_dir):
        raise UsageError(f"run folder {run_dir} is not empty; use --overwrite to replace it or --resume")
    recognise_run_folder(run_dir)


def write_run_info(run_dir: Path, command: str) -> None:
    """``run.json``: the command that made the folder (``--resume`` continues only that command)."""
    text = json.dumps({"format": 1, "command": command}) + "\n"
    atomic_write(Path(run_dir) / RUN_INFO, lambda tmp: Path(tmp).write_text(text))


def check_resume_command(run_dir: Path, command: str, phases: tuple[str, ...]) -> None:
    """``UsageError`` when ``run_dir`` was made by another command than ``command``: resuming it
    would train other phases and replace its results. Folders from before ``run.json`` are judged by
    the phases their checkpoints and metrics hold."""
    path = Path(run_dir) / RUN_INFO
    if path.exists():
        info = load_json(read_text(path, RUN_INFO), str(path))
        saved = field(info, "command", "str", str(path))
        if saved != command:
            name = short(saved, 40).strip("'\"")
            raise UsageError(
                f"cannot resume {run_dir} with {command}: it is a {name} run "
                f"(continue it with supcon {name} --resume)"
            )
        return
    done = {p.name.split("-e", 1)[0] for p in (Path(run_dir) / "checkpoints").glob("*-e*.pt")}
    other = sorted(done - set(phases))
    if other:
        raise UsageError(
            f"cannot resume {run_dir} with {command}: it holds {', '.join(other)} checkpoints, "
            f"which {command} does not train"
        )


def check_inputs_outside(run_dir: Path, inputs: dict[str, str | Path | None]) -> None:
    """``UsageError`` when an input (``{"--from": path, ...}``) lies inside ``run_dir``, which an
    ``--overwrite`` empties before the input is read: the source would be destroyed, then missing."""
    out = Path(run_dir).resolve()
    for flag, value in inputs.items():
        if value is None:
            continue
        src = Path(value).expanduser().resolve()
        if src == out or out in src.parents:
            raise UsageError(
                f"{flag} {short(str(value), 200)} lies inside --out {run_dir}, which --overwrite would "
                "empty first; write the new run to another folder"
            )
