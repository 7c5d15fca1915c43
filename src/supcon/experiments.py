"""The commands as library calls, in one table (:data:`COMMANDS`) that the command line and
:func:`run` share: ``compare`` (the Keras example's two experiments), the single phases, ``eval``.

Each training command writes a run folder (see :mod:`supcon.rundir`); :func:`finish` adds
``results.json``, ``report.md`` and the plots.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from supcon import dist
from supcon.checkpoint import save_weights
from supcon.config import PHASES, Config, load_preset, set_values
from supcon.datasets import ImageDataset, Split, load_split
from supcon.errors import UsageError
from supcon.evaluate import accuracy, encoder_knn, extract_features, predict
from supcon.longtail import group_report
from supcon.loop import Diverged
from supcon.models import load_phase_model
from supcon.phases import pretrain, train_ce, train_linear
from supcon.report import plot_curves, plot_tsne, write_report
from supcon.rundir import Run, default_run_dir, open_run, read_config, read_metrics
from supcon.runtime import resolve_runtime


def _load(run: Run) -> tuple[ImageDataset, Split]:
    return load_split(run.cfg.data, run.cfg.seed, run.progress and dist.is_main())


def _phase(run: Run, data: ImageDataset, phase: str, train: Callable[[], torch.nn.Module]):
    """Train a phase, or on resume load it if it already finished. Saves its weights (rank 0)."""
    path = run.weights(phase)
    if run.resume and path.is_file():
        if dist.is_main():
            print(f"{phase}: already finished, loaded {path}", flush=True)
        return load_phase_model(run.cfg, data, phase, path).to(run.rt.device).eval()
    model = train()
    if dist.is_main():
        save_weights(model, path, {"phase": phase, "config": run.cfg.to_yaml()})
    return model


def _encoder_use(cfg: Config) -> str:
    return "fine-tuned" if cfg.linear.finetune else "frozen"


def _classifier_name(cfg: Config) -> str:
    return f"{_encoder_use(cfg)} encoder + classifier"


def _row(run: Run, name: str, model, data: ImageDataset, phases: list[str], test_acc=None) -> dict:
    seconds = {p: [m["seconds"] for m in read_metrics(run.dir) if m["phase"] == p] for p in phases}
    pred = None
    if test_acc is None and dist.is_main():
        pred = predict(model, data.test_x, run.rt, data.norm)
        test_acc = accuracy(pred, data.test_y)
    return {
        "experiment": name,
        "test_acc": test_acc,
        "train_seconds": sum(sum(s) for s in seconds.values()),
        "phases": phases,
        "epoch_seconds": [sum(s) / max(1, len(s)) for s in seconds.values()],
        **group_report(pred, data, run.cfg.data.imbalance),  # long-tailed data: many/medium/few
    }


def _tsne(run: Run, data: ImageDataset, encoders: dict) -> tuple[Path | str, float]:
    n = min(len(data.test_y), 2000)
    sel = torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(run.cfg.seed))[:n].sort()
    sel = sel.values
    maps = {
        name: extract_features(enc, data.test_x[sel], run.rt, data.norm).cpu().numpy()
        for name, enc in encoders.items()
    }
    t0 = time.perf_counter()
    path = plot_tsne(maps, data.test_y[sel].numpy(), data.classes, run.dir / "tsne.png", run.cfg.seed)
    return path, time.perf_counter() - t0


def finish(run: Run, data: ImageDataset, title: str, rows: list[dict], encoders: dict) -> dict:
    """Results, plots and report (rank 0). Returns the results dict."""
    results = {"title": title, "dataset": data.summary(), "runtime": run.rt.describe(), "rows": rows}
    if not dist.is_main():
        return results
    (run.dir / "results.json").write_text(json.dumps(results, indent=1))
    images = [run.dir / "views.png"] if (run.dir / "views.png").is_file() else []
    curves = plot_curves(read_metrics(run.dir), run.dir / "curves.png")
    if curves:
        images.append(curves)
    if encoders:
        path, seconds = _tsne(run, data, encoders)
        images.append(path)
        results["tsne_seconds"] = round(seconds, 1)
    summary = [
        f"- data: {data.summary()}",
        f"- config: `{run.cfg.name}` (resolved in `config.yaml`), seed {run.cfg.seed}",
        f"- runtime: {run.rt.describe()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}",
    ]
    write_report(run.dir, title, summary, rows, images)
    return results


JOINT_ROW = "SupCon+CE joint classifier"


def _method(cfg: Config) -> str:
    return {"supcon": "SupCon", "simclr": "SimCLR", "supcon+ce": "SupCon+CE"}[cfg.loss.method]


def _joint_rows(run: Run, data: ImageDataset) -> list[dict]:
    """The classifier ``supcon+ce`` pre-training trained beside the loss (saved by the phase)."""
    if run.cfg.loss.method != "supcon+ce":
        return []
    joint = None
    if dist.is_main():  # rank 0 wrote the file and evaluates
        joint = load_phase_model(run.cfg, data, "joint", run.weights("joint")).to(run.rt.device)
    return [_row(run, JOINT_ROW, joint, data, ["pretrain"])]


def compare(run: Run) -> dict:
    """The Keras example's two experiments: cross-entropy vs contrastive pre-training + classifier."""
    data, split = _load(run)
    if dist.is_main():
        print(f"{data.summary()} | {run.rt.describe()} | run folder {run.dir}", flush=True)
    ce = _phase(run, data, "ce", lambda: train_ce(run, data, split))
    pre = _phase(run, data, "pretrain", lambda: pretrain(run, data, split))
    clf = _phase(run, data, "linear", lambda: train_linear(run, data, split, pre.encoder))
    name = f"{_method(run.cfg)} + {_encoder_use(run.cfg)} classifier"
    rows = [
        _row(run, "cross-entropy", ce, data, ["ce"]),
        _row(run, name, clf, data, ["pretrain", "linear"]),
        *_joint_rows(run, data),
    ]
    encoders = {"cross-entropy encoder": ce.encoder, f"{_method(run.cfg)} encoder": pre.encoder}
    return finish(run, data, f"supcon compare: {run.cfg.name} on {data.name}", rows, encoders)


def train_ce_only(run: Run) -> dict:
    data, split = _load(run)
    ce = _phase(run, data, "ce", lambda: train_ce(run, data, split))
    rows = [_row(run, "cross-entropy", ce, data, ["ce"])]
    title = f"supcon train-ce: {run.cfg.name} on {data.name}"
    return finish(run, data, title, rows, {"cross-entropy encoder": ce.encoder})


def pretrain_only(run: Run) -> dict:
    data, split = _load(run)
    cfg = run.cfg
    pre = _phase(run, data, "pretrain", lambda: pretrain(run, data, split))
    knn = None
    if dist.is_main():
        train, test = (split.train_x, split.train_y), (data.test_x, data.test_y)
        knn = encoder_knn(pre.encoder, train, test, run.rt, data.norm, cfg.knn_k, cfg.knn_temperature)
    name = f"{cfg.loss.method} pre-training (kNN, k={cfg.knn_k})"
    rows = [_row(run, name, pre, data, ["pretrain"], test_acc=knn), *_joint_rows(run, data)]
    title = f"supcon pretrain: {cfg.name} on {data.name}"
    return finish(run, data, title, rows, {"encoder": pre.encoder})


def linear_only(run: Run, from_dir: Path) -> dict:
    """Classifier on the encoder of a finished pre-training run."""
    data, split = _load(run)
    pre = load_phase_model(run.cfg, data, "pretrain", from_dir / "weights" / "pretrain.safetensors")
    clf = _phase(run, data, "linear", lambda: train_linear(run, data, split, pre.encoder))
    rows = [_row(run, _classifier_name(run.cfg), clf, data, ["linear"])]
    return finish(run, data, f"supcon linear: {run.cfg.name} on {data.name}", rows, {})


def evaluate_run(run_dir: Path, device: str = "auto") -> list[dict]:
    """Test accuracy of every trained model in a run folder (and kNN of a pre-trained encoder)."""
    cfg = read_config(run_dir)
    rt = resolve_runtime(device, cfg.precision, cfg.channels_last)
    data, _ = load_split(cfg.data, cfg.seed)
    w = run_dir / "weights"
    names = {"ce": "cross-entropy", "linear": _classifier_name(cfg), "joint": JOINT_ROW}
    out = []
    for phase in ("ce", "linear", "joint"):
        if (w / f"{phase}.safetensors").is_file():
            m = load_phase_model(cfg, data, phase, w / f"{phase}.safetensors").to(rt.device)
            out.append(
                {
                    "experiment": names[phase],
                    "test_acc": accuracy(predict(m, data.test_x, rt, data.norm), data.test_y),
                }
            )
    if (w / "pretrain.safetensors").is_file():
        pre = load_phase_model(cfg, data, "pretrain", w / "pretrain.safetensors").to(rt.device)
        acc = encoder_knn(
            pre.encoder, (data.train_x, data.train_y), (data.test_x, data.test_y), rt, data.norm, cfg.knn_k,
            cfg.knn_temperature,
        )  # fmt: skip
        out.append({"experiment": f"pre-trained encoder, kNN (k={cfg.knn_k})", "test_acc": acc})
    if not out:
        raise UsageError(f"no trained weights in {w}")
    return out


@dataclass(frozen=True)
class Command:
    help: str
    phases: tuple[str, ...]  # the phases its --epochs/--batch-size/--lr apply to
    trains: bool = True  # opens a run folder (False: reads one, --from)
    needs_from: bool = False  # --from DIR: a run folder to start from


COMMANDS: dict[str, Command] = {
    "compare": Command(
        "the Keras example's two experiments: cross-entropy vs contrastive pre-training + classifier", PHASES
    ),
    "train-ce": Command("experiment 1 alone: encoder + classifier trained with cross-entropy", ("ce",)),
    "pretrain": Command(
        "contrastive pre-training of the encoder (SupCon, or SimCLR with --method simclr)", ("pretrain",)
    ),
    "linear": Command(
        "classifier on the encoder of a pre-training run (--from DIR): frozen, or --finetune",
        ("linear",),
        needs_from=True,
    ),
    "eval": Command(
        "test accuracy (and kNN) of the models in a run folder (--from DIR)",
        (),
        trains=False,
        needs_from=True,
    ),
}


def run_command(run: Run, command: str, from_dir: Path | None = None) -> dict:
    """A training command of :data:`COMMANDS` in an opened run."""
    try:
        if command == "compare":
            return compare(run)
        if command == "train-ce":
            return train_ce_only(run)
        if command == "pretrain":
            return pretrain_only(run)
        return linear_only(run, from_dir)
    except Diverged as e:
        if dist.is_main():
            _report_failure(run, command, str(e))
        raise


def _report_failure(run: Run, command: str, message: str) -> None:
    """A report that says why the run stopped, with the curves up to that point."""
    curves = plot_curves(read_metrics(run.dir), run.dir / "curves.png")
    title = f"supcon {command}: {run.cfg.name} stopped"
    write_report(run.dir, title, [f"**Training stopped**: {message}"], [], [curves] if curves else [])


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
    the ``from_dir`` run, or on ``resume`` from the saved one. Returns the results dict (also
    written to ``<out>/results.json``); ``eval`` returns ``{"rows": [...]}``. ``seeds=[0, 1, 2]``
    repeats the command in ``<out>/seed-N`` and aggregates (:mod:`supcon.repeats`). Process-wide CPU
    settings (:func:`supcon.runtime.tune_cpu`) apply only with ``overrides={"tune_cpu": True}``.
    """
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)}")
    spec = COMMANDS[command]
    from_dir = Path(from_dir) if from_dir is not None else None
    if spec.needs_from and from_dir is None:
        raise UsageError(f"{command} needs from_dir (a finished run folder)")
    if not spec.trains:
        return {"rows": evaluate_run(from_dir, device)}
    run_dir = Path(out) if out is not None else default_run_dir(command)
    if seeds is not None:
        from supcon.repeats import fresh_seed_preset, run_seeds, seed_source

        def one(seed: int, folder: Path, again: bool) -> dict:
            kw = {"overrides": {**(overrides or {}), "seed": seed}, "overwrite": overwrite, "resume": again}
            base = fresh_seed_preset(command, run_dir, preset) if resume and not again else preset
            src = seed_source(from_dir, seed)
            return run(command, base, folder, **kw, progress=progress, from_dir=src, device=device)

        return run_seeds(command, seeds, run_dir, one, resume=resume)
    cfg = base_config(command, preset, run_dir if resume else None, from_dir)
    set_values(cfg, overrides or {})
    if cfg.tune_cpu is None:
        cfg.tune_cpu = False
    handle = open_run(cfg, run_dir, overwrite=overwrite, resume=resume, progress=progress)
    try:
        with handle.stop:
            return run_command(handle, command, from_dir)
    finally:
        handle.close()


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


__all__ = [
    "COMMANDS",
    "compare",
    "evaluate_run",
    "finish",
    "linear_only",
    "pretrain_only",
    "run",
    "run_command",
    "train_ce_only",
]
