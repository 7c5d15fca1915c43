"""The experiments as library calls: ``compare`` (the seed's two experiments) and the single phases.

Each writes a run folder: ``config.yaml``, ``metrics.jsonl``, ``results.json``, ``weights/``,
``checkpoints/``, ``report.md`` and PNG plots.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open

from supcon import dist
from supcon.checkpoint import load_weights, save_weights
from supcon.config import Config, from_dict, validate
from supcon.datasets import ImageDataset, load_dataset, split_validation
from supcon.errors import UsageError
from supcon.report import plot_curves, plot_tsne, read_metrics, table, write_report
from supcon.runtime import resolve_runtime, seed_everything
from supcon.train import (
    Classifier,
    ContrastiveModel,
    RunContext,
    Split,
    accuracy,
    check_run_dir,
    extract_features,
    knn_accuracy,
    make_encoder,
    make_head,
    make_projection,
    predict,
    pretrain,
    train_ce,
    train_linear,
)


def load_data(cfg: Config, rt, progress: bool = True) -> tuple[ImageDataset, Split]:
    """The dataset and its train/validation split; sets the runtime's input normalisation if asked."""
    d = cfg.data
    data = load_dataset(d.dataset, d.path, image_size=d.image_size, seed=cfg.seed, progress=progress)
    split = Split(*split_validation(data.train_x, data.train_y, d.val_fraction, cfg.seed))
    if d.normalize:
        rt.mean, rt.std = channel_stats(split.train_x)
    return data, split


def _load(ctx: RunContext) -> tuple[ImageDataset, Split]:
    return load_data(ctx.cfg, ctx.rt, ctx.progress and dist.is_main())


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std (in [0, 1] units) of uint8 images [N, H, W, C]."""
    x = images.reshape(-1, images.shape[-1])
    mean = torch.zeros(x.shape[1], dtype=torch.float64)
    sq = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, len(x), 1 << 22):  # chunks keep the float copy small
        c = x[i : i + (1 << 22)].double() / 255.0
        mean += c.sum(0)
        sq += c.square().sum(0)
    mean /= len(x)
    std = (sq / len(x) - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def open_run(
    cfg: Config,
    run_dir: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    stop_after: int | None = None,
) -> RunContext:
    """Validate, prepare the run folder (rank 0) and the runtime. ``device`` overrides ``cfg.device``
    for this process only (each rank's own GPU); it is not part of the saved config."""
    validate(cfg)
    check_run_dir(run_dir, overwrite, resume)
    dist.barrier()  # every rank has looked at the folder before rank 0 writes into it
    if resume:
        saved = from_dict(_read_yaml(run_dir / "config.yaml"))
        diff = _diff(saved.to_dict(), cfg.to_dict())
        if diff:
            raise UsageError(f"cannot resume {run_dir}: the config differs in {'; '.join(diff)}")
    elif dist.is_main():
        if run_dir.exists() and overwrite:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    dist.barrier()
    seed_everything(cfg.seed, cfg.deterministic)
    rt = resolve_runtime(device or cfg.device, cfg.precision, cfg.channels_last)
    return RunContext(
        cfg=cfg, rt=rt, run_dir=run_dir, resume=resume, progress=progress, stop_after=stop_after
    )


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} (saved) vs {vb!r} (now)")
    return out


def _phase_weights(ctx: RunContext, phase: str) -> Path:
    return ctx.run_dir / "weights" / f"{phase}.safetensors"


def _phase_seconds(run_dir: Path, phase: str) -> list[float]:
    return [m["seconds"] for m in read_metrics(run_dir) if m["phase"] == phase]


def _run_phase(ctx: RunContext, phase: str, build, train):
    """Train a phase, or on resume load it if it already finished. Saves weights (rank 0)."""
    path = _phase_weights(ctx, phase)
    if ctx.resume and path.is_file():
        model = build()
        load_weights(model, path)
        if dist.is_main():
            print(f"{phase}: already finished, loaded {path}", flush=True)
        return model.to(ctx.rt.device)
    model = train()
    if dist.is_main():
        save_weights(model, path, {"phase": phase, "config": ctx.cfg.to_yaml()})
    return model


def run_ce(ctx: RunContext, data: ImageDataset, split: Split) -> Classifier:
    def build():
        enc = make_encoder(ctx.cfg, data)
        return Classifier(enc, make_head(ctx.cfg, enc.feature_dim, data.num_classes))

    return _run_phase(ctx, "ce", build, lambda: train_ce(ctx, data, split))


def run_pretrain(ctx: RunContext, data: ImageDataset, split: Split) -> ContrastiveModel:
    def build():
        enc = make_encoder(ctx.cfg, data)
        return ContrastiveModel(enc, make_projection(ctx.cfg, enc.feature_dim))

    return _run_phase(ctx, "pretrain", build, lambda: pretrain(ctx, data, split))


def run_linear(ctx: RunContext, data: ImageDataset, split: Split, encoder: torch.nn.Module) -> Classifier:
    """The classifier phase. Its weights file holds the whole classifier (encoder + head), so a
    classifier run folder can be evaluated on its own."""
    path = _phase_weights(ctx, "linear")
    if ctx.resume and path.is_file():
        model = Classifier(encoder, make_head(ctx.cfg, encoder.feature_dim, data.num_classes))
        return load_classifier(model, path).to(ctx.rt.device).eval()
    model = train_linear(ctx, data, split, encoder)
    if dist.is_main():
        save_weights(model, path, {"phase": "linear", "config": ctx.cfg.to_yaml()})
    return model


def load_classifier(model: Classifier, path: Path, has_encoder: bool = True) -> Classifier:
    """Load a classifier phase's weights: the whole classifier, or (files written before classifier
    files held the encoder) the head alone onto the pre-trained encoder ``model`` already has."""
    with safe_open(str(path), "pt") as f:
        whole = any(k.startswith("encoder.") for k in f.keys())  # noqa: SIM118 (not a dict)
    if not whole and not has_encoder:
        raise UsageError(f"{path} holds only a classifier head and no pre-trained encoder is beside it")
    load_weights(model if whole else model.head, path)
    return model


def _encoder_use(cfg: Config) -> str:
    return "fine-tuned" if cfg.linear.finetune else "frozen"


def _classifier_name(cfg: Config) -> str:
    return f"{_encoder_use(cfg)} encoder + classifier"


def _row(ctx: RunContext, name: str, model, data: ImageDataset, phases: list[str]) -> dict:
    seconds = [sum(_phase_seconds(ctx.run_dir, p)) for p in phases]
    per_epoch = [
        s / max(1, len(_phase_seconds(ctx.run_dir, p))) for s, p in zip(seconds, phases, strict=True)
    ]
    return {
        "experiment": name,
        "test_acc": accuracy(predict(model, data.test_x, ctx.rt), data.test_y),
        "train_seconds": sum(seconds),
        "phases": phases,
        "epoch_seconds": per_epoch,
    }


def finish(ctx: RunContext, data: ImageDataset, title: str, rows: list[dict], encoders: dict) -> dict:
    """Results, plots and report (rank 0). Returns the results dict."""
    results = {"title": title, "dataset": data.summary(), "runtime": ctx.rt.describe(), "rows": rows}
    if not dist.is_main():
        return results
    run_dir = ctx.run_dir
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    images = [run_dir / "views.png"] if (run_dir / "views.png").is_file() else []
    curves = plot_curves(read_metrics(run_dir), run_dir / "curves.png")
    if curves:
        images.append(curves)
    if encoders:
        n = min(len(data.test_y), 2000)
        g = torch.Generator().manual_seed(ctx.cfg.seed)
        sel = torch.randperm(len(data.test_y), generator=g)[:n].sort().values
        maps = {
            name: extract_features(enc, data.test_x[sel], ctx.rt).cpu().numpy()
            for name, enc in encoders.items()
        }
        t0 = time.perf_counter()
        images.append(
            plot_tsne(maps, data.test_y[sel].numpy(), data.classes, run_dir / "tsne.png", ctx.cfg.seed)
        )
        results["tsne_seconds"] = round(time.perf_counter() - t0, 1)
    summary = [
        f"- data: {data.summary()}",
        f"- config: `{ctx.cfg.name}` (resolved in `config.yaml`), seed {ctx.cfg.seed}",
        f"- runtime: {ctx.rt.describe()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}",
    ]
    write_report(run_dir, title, summary, rows, images)
    return results


def compare(ctx: RunContext) -> dict:
    """The seed's two experiments: cross-entropy baseline vs contrastive pre-training + frozen classifier."""
    data, split = _load(ctx)
    if dist.is_main():
        print(f"{data.summary()} | {ctx.rt.describe()} | run folder {ctx.run_dir}", flush=True)
    ce = run_ce(ctx, data, split)
    pre = run_pretrain(ctx, data, split)
    clf = run_linear(ctx, data, split, pre.encoder)
    method = "SupCon" if ctx.cfg.loss.method == "supcon" else "SimCLR"
    rows = [
        _row(ctx, "cross-entropy", ce, data, ["ce"]),
        _row(
            ctx,
            f"{method} + {_encoder_use(ctx.cfg)} classifier",
            clf,
            data,
            ["pretrain", "linear"],
        ),
    ]
    return finish(
        ctx,
        data,
        f"supcon compare: {ctx.cfg.name} on {data.name}",
        rows,
        {
            "cross-entropy encoder": ce.encoder,
            f"{method} encoder": pre.encoder,
        },
    )


def train_ce_only(ctx: RunContext) -> dict:
    data, split = _load(ctx)
    ce = run_ce(ctx, data, split)
    rows = [_row(ctx, "cross-entropy", ce, data, ["ce"])]
    return finish(
        ctx,
        data,
        f"supcon train-ce: {ctx.cfg.name} on {data.name}",
        rows,
        {"cross-entropy encoder": ce.encoder},
    )


def pretrain_only(ctx: RunContext) -> dict:
    data, split = _load(ctx)
    pre = run_pretrain(ctx, data, split)
    bank = extract_features(pre.encoder, split.train_x, ctx.rt)
    test = extract_features(pre.encoder, data.test_x, ctx.rt)
    knn = knn_accuracy(bank, split.train_y, test, data.test_y, ctx.cfg.knn_k, ctx.cfg.knn_temperature)
    seconds = _phase_seconds(ctx.run_dir, "pretrain")
    rows = [
        {
            "experiment": f"{ctx.cfg.loss.method} pre-training (kNN, k={ctx.cfg.knn_k})",
            "test_acc": knn,
            "train_seconds": sum(seconds),
            "epoch_seconds": [sum(seconds) / max(1, len(seconds))],
        }
    ]
    return finish(
        ctx, data, f"supcon pretrain: {ctx.cfg.name} on {data.name}", rows, {"encoder": pre.encoder}
    )


def linear_only(ctx: RunContext, from_dir: Path) -> dict:
    """Classifier on the frozen encoder of a finished pre-training run."""
    data, split = _load(ctx)
    weights = from_dir / "weights" / "pretrain.safetensors"
    enc = make_encoder(ctx.cfg, data)
    model = ContrastiveModel(enc, make_projection(ctx.cfg, enc.feature_dim))
    load_weights(model, weights)
    clf = run_linear(ctx, data, split, model.encoder)
    rows = [_row(ctx, _classifier_name(ctx.cfg), clf, data, ["linear"])]
    return finish(ctx, data, f"supcon linear: {ctx.cfg.name} on {data.name}", rows, {})


def evaluate_run(cfg: Config, run_dir: Path, device: str = "auto") -> list[dict]:
    """Test accuracy of every trained model in a run folder."""
    rt = resolve_runtime(device, cfg.precision, cfg.channels_last)
    data, _ = load_data(cfg, rt)
    out = []
    w = run_dir / "weights"
    if (w / "ce.safetensors").is_file():
        enc = make_encoder(cfg, data)
        m = load_weights(
            Classifier(enc, make_head(cfg, enc.feature_dim, data.num_classes)), w / "ce.safetensors"
        )
        out.append(
            {
                "experiment": "cross-entropy",
                "test_acc": accuracy(predict(m.to(rt.device), data.test_x, rt), data.test_y),
            }
        )
    pre = None
    if (w / "pretrain.safetensors").is_file():
        enc = make_encoder(cfg, data)
        pre = load_weights(
            ContrastiveModel(enc, make_projection(cfg, enc.feature_dim)), w / "pretrain.safetensors"
        ).to(rt.device)
    if (w / "linear.safetensors").is_file():
        enc = copy.deepcopy(pre.encoder) if pre is not None else make_encoder(cfg, data)
        m = Classifier(enc, make_head(cfg, enc.feature_dim, data.num_classes))
        m = load_classifier(m, w / "linear.safetensors", has_encoder=pre is not None)
        out.append(
            {
                "experiment": _classifier_name(cfg),
                "test_acc": accuracy(predict(m.to(rt.device), data.test_x, rt), data.test_y),
            }
        )
    if pre is not None:
        bank = extract_features(pre.encoder, data.train_x, rt)
        test = extract_features(pre.encoder, data.test_x, rt)
        out.append(
            {
                "experiment": f"pre-trained encoder, kNN (k={cfg.knn_k})",
                "test_acc": knn_accuracy(
                    bank, data.train_y, test, data.test_y, cfg.knn_k, cfg.knn_temperature
                ),
            }
        )
    if not out:
        raise UsageError(f"no trained weights in {w}")
    return out


def run(
    command: str = "compare",
    preset: str = "keras-example",
    out: str | Path | None = None,
    *,
    overrides: dict | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    from_dir: str | Path | None = None,
) -> dict:
    """The command line's experiments from Python. ``overrides`` maps dotted keys to values::

        run("compare", "keras-example", "runs/demo",
            overrides={"data.dataset": "digits", "ce.epochs": 5, "pretrain.epochs": 5, "linear.epochs": 5})

    Returns the results dict (also written to ``<out>/results.json``).
    """
    from supcon.config import load_preset, set_values

    cfg = load_preset(preset)
    set_values(cfg, overrides or {})
    run_dir = Path(out) if out is not None else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)}")
    if command == "linear" and from_dir is None:
        raise UsageError("linear needs from_dir (a finished pre-training run)")
    ctx = open_run(cfg, run_dir, overwrite=overwrite, resume=resume, progress=progress)
    with ctx.stop:
        return run_command(ctx, command, Path(from_dir) if from_dir is not None else None)


COMMANDS = ("compare", "train-ce", "pretrain", "linear")


def run_command(ctx: RunContext, command: str, from_dir: Path | None = None) -> dict:
    """One of COMMANDS in an opened run (shared by the command line and :func:`run`)."""
    if command == "compare":
        return compare(ctx)
    if command == "train-ce":
        return train_ce_only(ctx)
    if command == "pretrain":
        return pretrain_only(ctx)
    return linear_only(ctx, from_dir)


__all__ = [
    "compare",
    "evaluate_run",
    "linear_only",
    "open_run",
    "pretrain_only",
    "run",
    "run_command",
    "table",
    "train_ce_only",
]
