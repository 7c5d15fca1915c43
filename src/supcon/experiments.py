"""The commands as library calls, named by the command table (:mod:`supcon.commands`) that
:mod:`supcon.driver` runs for the command line and :func:`supcon.run`: ``compare`` (the Keras
example's two experiments), the single phases, ``eval``. Each takes the opened run and ``--from``
(used by ``linear`` alone: the others offer no ``--from``).

Each training command writes a run folder (see :mod:`supcon.runs.folder`); :func:`finish` adds
``results.json``, ``report.md`` and the plots.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from supcon.core import dist
from supcon.core.checkpoint import save_weights
from supcon.core.config import Config
from supcon.core.errors import UsageError
from supcon.core.files import atomic_write
from supcon.core.runlog import read_metrics
from supcon.core.runtime import resolve_runtime
from supcon.data.dataset import ImageDataset, Split
from supcon.data.datasets import load_split
from supcon.evaluation import multilabel
from supcon.evaluation.evaluate import (
    accuracy,
    encoder_knn,
    encoder_knn_scores,
    knn_accuracy,
    predict,
    predict_logits,
)
from supcon.evaluation.longtail import group_report
from supcon.evaluation.plots import plot_confusion, plot_curves
from supcon.evaluation.report import confusion_matrix, retrieval_section, write_report
from supcon.evaluation.retrieval_report import (
    TSNE_POINTS,
    Features,
    encoder_features,
    open_set_block,
    retrieval_block,
    retrieval_panel,
    tsne_map,
)
from supcon.models.build import Classifier, build_encoder_for, load_phase_model
from supcon.runs.folder import read_config
from supcon.runs.modelinfo import write_model_info
from supcon.train.context import Run
from supcon.train.phases import pretrain, train_ce, train_linear


def _load(run: Run) -> tuple[ImageDataset, Split]:
    data, split = load_split(run.cfg.data, run.cfg.seed, run.progress and dist.is_main())
    if dist.is_main():
        write_model_info(run.dir, run.cfg, data)  # model.json: what the weights need to be used
        warn_unseen_classes(data)
    return data, split


def unseen_classes(data: ImageDataset) -> list[str]:
    """Single-label classes in the test split with no training image: a classifier cannot predict
    them, so every such test image counts as an error."""
    if data.multilabel or len(data.test_y) == 0:
        return []
    seen = set(torch.as_tensor(data.train_y).unique().tolist())
    tested = set(torch.as_tensor(data.test_y).unique().tolist())
    return [data.classes[k] for k in sorted(tested - seen) if 0 <= k < len(data.classes)]


def warn_unseen_classes(data: ImageDataset) -> None:
    unseen = unseen_classes(data)
    if unseen:
        shown = ", ".join(map(str, unseen[:5])) + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
        print(
            f"supcon: warning: {len(unseen)} class(es) only in the test split, never trained on "
            f"(their test images cannot be classified correctly): {shown}",
            file=sys.stderr, flush=True,
        )  # fmt: skip


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


def _predict(run: Run, data: ImageDataset, model) -> torch.Tensor | None:
    """Test-set predictions: class ids, or for multi-label data the logits (rank 0; None elsewhere)."""
    if not dist.is_main():
        return None
    return (predict_logits if data.multilabel else predict)(model, data.test_x, run.rt, data.norm)


def _row(
    run: Run, name: str, pred, data: ImageDataset, phases: list[str], test_acc=None, scores=None
) -> dict:
    """A result row: test accuracy of the predictions ``pred`` (or a given ``test_acc``), or for
    multi-label data mAP, micro/macro-F1 and per-class AP of the logits ``pred`` or of ``scores``
    (kNN vote shares)."""
    seconds = {p: [m["seconds"] for m in read_metrics(run.dir) if m["phase"] == p] for p in phases}
    times = {
        "train_seconds": sum(sum(s) for s in seconds.values()),
        "phases": phases,
        "epoch_seconds": [sum(s) / max(1, len(s)) for s in seconds.values()],
    }
    if data.multilabel:
        return {"experiment": name, **_multilabel_metrics(data, pred, scores), **times}
    if pred is not None:
        test_acc = accuracy(pred, data.test_y)
    return {
        "experiment": name,
        "test_acc": test_acc,
        **times,
        **group_report(pred, data, run.cfg.data.imbalance),  # long-tailed data: many/medium/few
    }


def _multilabel_metrics(data: ImageDataset, logits, scores) -> dict:
    if scores is not None:
        return multilabel.metrics(scores, data.test_y, data.classes, probabilities=True)
    return {} if logits is None else multilabel.metrics(logits, data.test_y, data.classes)


def finish(
    run: Run,
    data: ImageDataset,
    title: str,
    rows: list[dict],
    encoders: dict,
    predictions: dict[str, tuple[str, torch.Tensor]] | None = None,
) -> dict:
    """Results, plots and report (rank 0). ``predictions``: phase -> (classifier name, test-set
    predictions) for the confusion matrices. Returns the results dict; each part's seconds go to
    ``report_seconds``, and what is being done to the progress output."""
    results = {"title": title, "dataset": data.summary(), "runtime": run.rt.describe(), "rows": rows}
    if not dist.is_main():
        return results
    clock = _Clock(run)
    clock.start("plots", "training curves")
    images = [run.dir / "views.png"] if (run.dir / "views.png").is_file() else []
    curves = plot_curves(read_metrics(run.dir), run.dir / "curves.png")
    if curves:
        images.append(curves)
    sections: list[str] = []
    if encoders and data.multilabel:
        # Retrieval metrics, the panel, t-SNE colours and confusion matrices need one class an image.
        images.append("t-SNE map not drawn, nor retrieval metrics or confusion matrices: multi-label data")
        predictions = None
    elif encoders:
        _retrieval_and_maps(run, data, encoders, results, images, sections, clock)
    clock.start("confusion", "confusion matrices and report.md")
    for phase, (name, pred) in (predictions or {}).items():
        matrix = confusion_matrix(pred.numpy(), data.test_y.numpy(), data.num_classes)
        images.append(plot_confusion(matrix, data.classes, run.dir / f"confusion-{phase}.png", name))
    results["report_seconds"] = clock.stop()
    results = rounded(results)
    text = json.dumps(results, indent=1)
    atomic_write(run.dir / "results.json", lambda tmp: Path(tmp).write_text(text))
    write_report(run.dir, title, _summary(run, data), rows, images, sections=sections)
    return results


class _Clock:
    """Seconds per part of the report, and a progress line as each part starts."""

    def __init__(self, run: Run):
        self.run, self.seconds, self.part, self.t0 = run, {}, None, 0.0

    def start(self, part: str, what: str) -> None:
        self.stop()
        self.part, self.t0 = part, time.perf_counter()
        if self.run.progress:
            print(f"report: {what}", flush=True)

    def stop(self) -> dict[str, float]:
        if self.part is not None:
            self.seconds[self.part] = round(time.perf_counter() - self.t0, 2)
            self.part = None
        return self.seconds


def _retrieval_and_maps(run, data, encoders, results, images, sections, clock: _Clock) -> None:
    """The encoders' retrieval blocks (closed and open set), the retrieval panel and the t-SNE map."""
    n_train, n_test = len(data.train_y), len(data.test_y)
    clock.start("features", f"features of {n_train + n_test:,} images under {len(encoders)} encoder(s)")
    feats = encoder_features(encoders, data, run.rt)
    clock.start("retrieval", f"retrieval of {n_test:,} test images among {n_train:,} training images")
    results["retrieval"] = retrieval_block(feats, data)
    sections += retrieval_section("Retrieval (test images against the training set)", results["retrieval"])
    open_set = open_set_block(run.rt, data, encoders)
    if open_set is not None:
        results["retrieval_open_set"] = open_set
        heading = f"Open-set retrieval (classes never trained on: {', '.join(open_set['classes'])})"
        sections += retrieval_section(heading, open_set)
    images.append(retrieval_panel(run.dir, run.cfg.seed, data, feats))
    clock.start("tsne", f"t-SNE map of {min(n_test, TSNE_POINTS):,} test images")
    path, seconds = tsne_map(run.dir, run.cfg.seed, data, feats)
    images.append(path)
    results["tsne_seconds"] = round(seconds, 1)


def _summary(run: Run, data: ImageDataset) -> list[str]:
    summary = [
        f"- data: {data.summary()}",
        f"- config: `{run.cfg.name}` (resolved in `config.yaml`), seed {run.cfg.seed}",
        f"- runtime: {run.rt.describe()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}",
    ]
    if data.held_out is not None:
        held = data.held_out
        summary.append(
            f"- held out of training (data.exclude_classes): {len(held.train_y)} training and "
            f"{len(held.test_y)} test images, evaluated as open-set retrieval only"
        )
    return summary


def rounded(obj, digits: int = 6):
    """``obj`` with every float rounded to ``digits`` decimals: accuracies over at most a million
    images, not float32 noise (0.9822221994400024 -> 0.982222)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(rounded(v, digits) for v in obj)
    return obj


JOINT_ROW = "SupCon+CE joint classifier"


def _method(cfg: Config) -> str:
    names = {"supcon": "SupCon", "simclr": "SimCLR", "supcon+ce": "SupCon+CE", "bcl": "BCL"}
    return names.get(cfg.loss.method, cfg.loss.method)


def _bcl_rows(run: Run, pre, data: ImageDataset) -> list[dict]:
    """BCL trains a classifier with the encoder: its own result row (none for other methods)."""
    if run.cfg.loss.method != "bcl":
        return []
    clf = Classifier(pre.encoder, pre.classifier)
    return [_row(run, "BCL classifier", _predict(run, data, clf), data, ["pretrain"])]


def _joint_rows(run: Run, data: ImageDataset) -> list[dict]:
    """The classifier ``supcon+ce`` pre-training trained beside the loss (saved by the phase)."""
    if run.cfg.loss.method != "supcon+ce":
        return []
    joint = None
    if dist.is_main():  # rank 0 wrote the file and evaluates
        joint = load_phase_model(run.cfg, data, "joint", run.weights("joint")).to(run.rt.device)
    return [
        _row(run, JOINT_ROW, _predict(run, data, joint) if joint is not None else None, data, ["pretrain"])
    ]


def compare(run: Run, from_dir: Path | None = None) -> dict:
    """The Keras example's two experiments: cross-entropy vs contrastive pre-training + classifier."""
    data, split = _load(run)
    if dist.is_main():
        print(f"{data.summary()} | {run.rt.describe()} | run folder {run.dir}", flush=True)
    ce = _phase(run, data, "ce", lambda: train_ce(run, data, split))
    pre = _phase(run, data, "pretrain", lambda: pretrain(run, data, split))
    clf = _phase(run, data, "linear", lambda: train_linear(run, data, split, pre.encoder))
    name = f"{_method(run.cfg)} + {_encoder_use(run.cfg)} classifier"
    preds = {"ce": ("cross-entropy", _predict(run, data, ce)), "linear": (name, _predict(run, data, clf))}
    rows = [
        _row(run, "cross-entropy", preds["ce"][1], data, ["ce"]),
        _row(run, name, preds["linear"][1], data, ["pretrain", "linear"]),
        *_bcl_rows(run, pre, data),
        *_joint_rows(run, data),
    ]
    encoders = {"cross-entropy encoder": ce.encoder, f"{_method(run.cfg)} encoder": pre.encoder}
    title = f"supcon compare: {run.cfg.name} on {data.name}"
    return finish(run, data, title, rows, encoders, preds)


def train_ce_only(run: Run, from_dir: Path | None = None) -> dict:
    data, split = _load(run)
    ce = _phase(run, data, "ce", lambda: train_ce(run, data, split))
    preds = {"ce": ("cross-entropy", _predict(run, data, ce))}
    rows = [_row(run, "cross-entropy", preds["ce"][1], data, ["ce"])]
    title = f"supcon train-ce: {run.cfg.name} on {data.name}"
    return finish(run, data, title, rows, {"cross-entropy encoder": ce.encoder}, preds)


def pretrain_only(run: Run, from_dir: Path | None = None) -> dict:
    data, split = _load(run)
    cfg = run.cfg
    pre = _phase(run, data, "pretrain", lambda: pretrain(run, data, split))
    knn = scores = None
    if dist.is_main():
        train, test = (split.train_x, split.train_y), (data.test_x, data.test_y)
        k, temp = cfg.knn_k, cfg.knn_temperature
        if data.multilabel:
            scores = encoder_knn_scores(pre.encoder, train, data.test_x, run.rt, data.norm, k, temp)
        else:
            knn = encoder_knn(pre.encoder, train, test, run.rt, data.norm, k, temp)
    name = f"{cfg.loss.method} pre-training (kNN, k={cfg.knn_k})"
    rows = [_row(run, name, None, data, ["pretrain"], knn, scores), *_bcl_rows(run, pre, data)]
    rows += _joint_rows(run, data)
    title = f"supcon pretrain: {cfg.name} on {data.name}"
    return finish(run, data, title, rows, {f"{_method(cfg)} encoder": pre.encoder})


def linear_only(run: Run, from_dir: Path | None) -> dict:
    """Classifier on the encoder of a finished pre-training run, or on a pre-trained backbone's
    weights file (``model.pretrained``) when there is no run to start from."""
    if from_dir is None and run.cfg.model.pretrained is None:
        raise UsageError(
            "linear needs --from DIR (a pre-training run) or --pretrained FILE (encoder weights)"
        )
    data, split = _load(run)
    if from_dir is None:
        encoder = build_encoder_for(run.cfg, data, pretrained=True)
    else:
        encoder = load_phase_model(
            run.cfg, data, "pretrain", from_dir / "weights" / "pretrain.safetensors"
        ).encoder
    clf = _phase(run, data, "linear", lambda: train_linear(run, data, split, encoder))
    preds = {"linear": (_classifier_name(run.cfg), _predict(run, data, clf))}
    rows = [_row(run, preds["linear"][0], preds["linear"][1], data, ["linear"])]
    return finish(run, data, f"supcon linear: {run.cfg.name} on {data.name}", rows, {}, preds)


def evaluate_folder(run_dir: Path, device: str = "auto", retrieval: bool = True) -> dict:
    """What a run folder's weights give on the test set: ``rows`` (test accuracy of each classifier,
    kNN of a pre-trained encoder) and, with ``retrieval``, the ``retrieval`` (and for a run with
    ``data.exclude_classes``, ``retrieval_open_set``) blocks of its encoders, as in ``results.json``."""
    cfg = read_config(run_dir)
    rt = resolve_runtime(device, cfg.precision, cfg.channels_last)
    data, _ = load_split(cfg.data, cfg.seed)
    w = run_dir / "weights"
    names = {"ce": "cross-entropy", "linear": _classifier_name(cfg), "joint": JOINT_ROW}
    rows, encoders = [], {}
    for phase in ("ce", "linear", "joint"):
        if (w / f"{phase}.safetensors").is_file():
            m = load_phase_model(cfg, data, phase, w / f"{phase}.safetensors").to(rt.device)
            rows.append(_test_row(names[phase], m, data, rt))
            if phase == "ce":
                encoders["cross-entropy encoder"] = m.encoder
    feats: Features = {}
    if (w / "pretrain.safetensors").is_file():
        pre = load_phase_model(cfg, data, "pretrain", w / "pretrain.safetensors").to(rt.device)
        name, knn_name = f"{_method(cfg)} encoder", f"pre-trained encoder, kNN (k={cfg.knn_k})"
        if data.multilabel:
            bank, k, t = (data.train_x, data.train_y), cfg.knn_k, cfg.knn_temperature
            scores = encoder_knn_scores(pre.encoder, bank, data.test_x, rt, data.norm, k, t)
            rows.append(
                {"experiment": knn_name, **multilabel.metrics(scores, data.test_y, data.classes, True)}
            )
        else:
            feats = encoder_features({name: pre.encoder}, data, rt)
            train_f, test_f = feats[name]
            acc = knn_accuracy(train_f, data.train_y, test_f, data.test_y, cfg.knn_k, cfg.knn_temperature)
            rows.append({"experiment": knn_name, "test_acc": acc})
        encoders[name] = pre.encoder
        if cfg.loss.method == "bcl":
            rows.append(_test_row("BCL classifier", Classifier(pre.encoder, pre.classifier), data, rt))
    if not rows:
        raise UsageError(f"no trained weights in {w}")
    out: dict = {"rows": rows}
    if retrieval and encoders and not data.multilabel:
        feats |= encoder_features({k: v for k, v in encoders.items() if k not in feats}, data, rt)
        out["retrieval"] = retrieval_block({k: feats[k] for k in encoders}, data)
        open_set = open_set_block(rt, data, encoders)
        if open_set is not None:
            out["retrieval_open_set"] = open_set
    return rounded(out)


def _test_row(name: str, model, data: ImageDataset, rt) -> dict:
    """A classifier's test accuracy, or for multi-label data its mAP, F1 scores and per-class AP."""
    if data.multilabel:
        logits = predict_logits(model, data.test_x, rt, data.norm)
        return {"experiment": name, **multilabel.metrics(logits, data.test_y, data.classes)}
    return {"experiment": name, "test_acc": accuracy(predict(model, data.test_x, rt, data.norm), data.test_y)}


def report_failure(run: Run, command: str, message: str) -> None:
    """A report that says why the run stopped, with the curves up to that point (rank 0)."""
    if not dist.is_main():
        return
    curves = plot_curves(read_metrics(run.dir), run.dir / "curves.png")
    title = f"supcon {command}: {run.cfg.name} stopped"
    write_report(run.dir, title, [f"**Training stopped**: {message}"], [], [curves] if curves else [])
