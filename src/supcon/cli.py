"""Command line: ``supcon compare | train-ce | pretrain | linear | eval | embed | export`` (also
``python -m supcon``).

Configuration is layered: a preset (``--preset NAME|FILE``, default ``keras-example``), then the
explicit flags, then ``--set section.key=value`` for any other field. Every flag is a row of
:data:`FLAGS` naming the config key it sets, and goes through the same path as ``--set``. The
commands and the tools that use a finished run (``embed``, ``export``) come from
:mod:`supcon.commands`, the table the Python API uses too; nothing heavy (torch) is imported until
the arguments are parsed, so ``--help`` and a wrong argument answer at once. Bad input ends with one
line on stderr and exit code 2.

From here a command flows: :func:`run` -> :func:`supcon.driver.execute` -> ``experiments.compare``
(or one phase) -> ``train.phases.pretrain`` -> ``train.loop.fit`` -> the phase's step ->
``losses.supcon.supcon_loss``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supcon.commands import COMMANDS, TOOLS
from supcon.core.config import Method, Precision, choices, preset_names
from supcon.core.errors import UsageError
from supcon.core.schema import short
from supcon.serve.options import EMBED_SPACES, EXPORT_FORMATS, EXPORT_SPACES, PROJECTOR_COUNT, SPLITS

if TYPE_CHECKING:
    from supcon.driver import Request


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {short(text)}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {short(text)}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _seed_list(text: str) -> list[int]:
    from supcon.runs.seeds import parse_seeds

    try:
        return parse_seeds(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True)
class Flag:
    flag: str
    key: str  # config key it sets; "{phase}." keys apply to every phase the command runs
    help: str
    group: str = "training"
    type: Any = str
    choices: tuple[str, ...] | None = None
    switch: bool = False  # a flag without a value that sets True
    metavar: str | None = None
    commands: tuple[str, ...] | None = None  # None: every training command


FLAGS: tuple[Flag, ...] = (
    Flag(
        "--dataset",
        "data.dataset",
        "registered dataset: digits, cifar10, cifar100, cifar10-lt, cifar100-lt, imagefolder",
        "data",
    ),  # fmt: skip
    Flag(
        "--data",
        "data.path",
        "image folder (PATH/train|test/<class>/* or PATH/<class>/*), CSV manifest (path,label[,split]) "
        "or a CIFAR copy",
        "data",
        metavar="PATH",
    ),  # fmt: skip
    Flag(
        "--image-size",
        "data.image_size",
        "training size N x N (image files from 64 px on: stored at their own aspect, cropped to N)",
        "data",
        _positive_int,
        metavar="N",
    ),  # fmt: skip
    Flag(
        "--test-fraction",
        "data.test_fraction",
        "test share of image files given without a split (per class, fixed seed)",
        "data",
        float,
        metavar="F",
    ),  # fmt: skip
    Flag(
        "--val-fraction",
        "data.val_fraction",
        "share of the training set held out for validation",
        "data",
        float,
        metavar="F",
    ),  # fmt: skip
    Flag("--epochs", "{phase}.epochs", "epochs of each phase run here", type=_positive_int, metavar="N"),
    Flag("--batch-size", "{phase}.batch_size", "(global) batch size", type=_positive_int, metavar="N"),
    Flag("--lr", "{phase}.lr", "learning rate", type=_positive_float),
    Flag("--seed", "seed", "random seed (data order, initial weights, augmentation)", type=int),
    Flag("--encoder", "model.encoder", "encoder from the registry (keras-cnn, resnet18, ...)"),
    Flag(
        "--pretrained",
        "model.pretrained",
        "encoder weights to start from (.safetensors, .pth, .pt, .bin)",
        metavar="FILE",
        commands=("compare", "train-ce", "pretrain", "linear"),
    ),  # fmt: skip
    Flag(
        "--method",
        "loss.method",
        "contrastive method",
        choices=choices(Method),
        commands=("compare", "pretrain"),
    ),  # fmt: skip
    Flag(
        "--temperature",
        "loss.temperature",
        "loss temperature",
        type=_positive_float,
        commands=("compare", "pretrain"),
    ),  # fmt: skip
    Flag("--device", "device", "auto (CUDA when present), cpu, cuda or cuda:N"),
    Flag(
        "--precision",
        "precision",
        "autocast precision (auto: bf16 where native, fp16 on older GPUs)",
        choices=choices(Precision),
    ),  # fmt: skip
    Flag("--tensorboard", "tensorboard", "per-epoch scalars in RUN/tensorboard/", "logging", switch=True),
    Flag("--sync-bn", "sync_bn", "synchronise BatchNorm over all processes (under torchrun)", switch=True),
    Flag(
        "--finetune",
        "linear.finetune",
        "train the pre-trained encoder with the classifier (default: frozen encoder)",
        switch=True,
        commands=("compare", "linear"),
    ),  # fmt: skip
)


def _embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="from_dir", type=Path, required=True, metavar="DIR",
                   help="run folder of a finished run (its model.json and weights/)")  # fmt: skip
    p.add_argument(
        "--data", metavar="PATH", help="image folder or CIFAR copy to embed (default: the run's dataset)"
    )
    p.add_argument(
        "--split", choices=SPLITS, default="test", help="which images (default test; all: train then test)"
    )
    p.add_argument("--space", choices=EMBED_SPACES, default="encoder",
                   help="encoder features (default) or the projection head's output")  # fmt: skip
    p.add_argument(
        "--no-normalize", action="store_true", help="keep the raw vectors (default: L2-normalised)"
    )
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="output file: .npz or .parquet")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--projector", type=Path, metavar="DIR",
                   help="also write TensorBoard projector files (tensorboard --logdir DIR)")  # fmt: skip
    p.add_argument("--projector-count", type=int, default=PROJECTOR_COUNT, metavar="N",
                   help=f"projector images: the first N (default {PROJECTOR_COUNT})")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="from_dir", type=Path, required=True, metavar="DIR",
                   help="run folder of a finished run (its model.json and weights/)")  # fmt: skip
    p.add_argument("--format", required=True, choices=tuple(EXPORT_FORMATS),
                   help="torchscript (.pt), onnx (.onnx) or safetensors (weights only)")  # fmt: skip
    p.add_argument("--space", choices=EXPORT_SPACES, default="encoder",
                   help="encoder embeddings (default), projection embeddings, classifier logits")  # fmt: skip
    p.add_argument("--out", type=Path, metavar="FILE", help="output file (default DIR/export/<space>.<ext>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


# The arguments of the tools that use a finished run (supcon.commands.TOOLS).
TOOL_ARGUMENTS = {"embed": _embed_arguments, "export": _export_arguments}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as for every other bad input
        if len(message) > 400:  # argparse quotes the argument whole: a 100 kB argument stays out
            message = message[:200] + " ... " + message[-150:]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _add_flags(p: argparse.ArgumentParser, command: str) -> None:
    groups: dict[str, Any] = {}
    for f in FLAGS:
        if f.commands is not None and command not in f.commands:
            continue
        group = groups.setdefault(f.group, p.add_argument_group(f.group))
        dest = f.flag[2:].replace("-", "_")
        if f.switch:
            group.add_argument(f.flag, dest=dest, action="store_true", default=None, help=f.help)
        else:
            group.add_argument(
                f.flag, dest=dest, type=f.type, choices=f.choices, metavar=f.metavar, help=f.help
            )
    cfg = p.add_argument_group("configuration")
    cfg.add_argument(
        "--preset",
        metavar="NAME|FILE",
        help=f"config preset or YAML file (default keras-example; one of: {', '.join(preset_names())})",
    )
    cfg.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set pretrain.lr=0.5 (repeatable)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, metavar="DIR", help="run folder (default runs/<command>-<time>)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    out.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    out.add_argument(
        "--stop-after",
        type=_positive_int,
        metavar="N",
        help="stop cleanly once a phase has N epochs (continue later with --resume)",
    )
    out.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    out.add_argument(
        "--seeds",
        type=_seed_list,
        metavar="LIST",
        help="repeat over seeds, e.g. 0,1,2 or 0-9: one run in OUT/seed-N each, then mean ± std in OUT",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="supcon", description="Supervised contrastive learning of image classifiers.")
    parser.add_argument("--version", action="version", version=f"supcon {__import__('supcon').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help)
        if spec.needs_from or spec.takes_from:
            p.add_argument(
                "--from",
                dest="from_dir",
                type=Path,
                required=spec.needs_from,
                metavar="DIR",
                help="run folder of a finished run (its config.yaml and weights/ are used)",
            )
        if spec.trains:
            _add_flags(p, name)
        else:
            p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    for name, (_, text) in TOOLS.items():
        TOOL_ARGUMENTS[name](sub.add_parser(name, help=text, description=text))
    return parser


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The explicit flags as ``{config key: value}`` (what ``--set`` would apply)."""
    phases = COMMANDS[args.command].phases
    out: dict[str, Any] = {}
    for f in FLAGS:
        value = getattr(args, f.flag[2:].replace("-", "_"), None)
        if value is None:
            continue
        keys = [f.key.format(phase=p) for p in phases] if "{phase}" in f.key else [f.key]
        out |= dict.fromkeys(keys, value)
    if args.data is not None:
        out["data.dataset"] = args.dataset  # None: recognised from the folder
    elif args.dataset is not None:
        out["data.path"] = None
    return out


def request(args: argparse.Namespace) -> Request:
    """The driver's request for parsed arguments: preset (or the saved config on --resume, or the
    --from run's for linear), then the explicit flags, then --set overrides."""
    from supcon.driver import Request

    trains = COMMANDS[args.command].trains
    return Request(
        args.command,
        preset=getattr(args, "preset", None),
        out=getattr(args, "out", None),
        from_dir=getattr(args, "from_dir", None),
        overrides=flag_overrides(args) if trains else {},
        assignments=list(getattr(args, "set", [])),
        seeds=getattr(args, "seeds", None),
        overwrite=getattr(args, "overwrite", False),
        resume=getattr(args, "resume", False),
        progress=not getattr(args, "quiet", False),
        stop_after=getattr(args, "stop_after", None),
        device=None if trains else args.device,
        tune_cpu=True,
        on_result=_print_result,
    )


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in TOOLS:
        return importlib.import_module(TOOLS[args.command][0]).main(args)
    from supcon import driver
    from supcon.core import dist

    req = driver.check(request(args))
    if not COMMANDS[req.command].trains:
        from supcon.evaluation.report import evaluation_text

        print(evaluation_text(driver.execute(req)))
        return 0
    # Under torchrun: join the process group (gloo on CPU, NCCL on CUDA); a no-op otherwise.
    first = driver.for_seed(req, req.seeds[0]) if req.seeds else req
    req.device = dist.init_from_env(driver.resolve_config(first).device)
    try:
        _train(req)
        # Every rank finishes (rank 0 writes the last files) before any rank tears down its
        # connections: a rank that exits while a peer still talks to it can abort in gloo.
        dist.barrier()
        return 0
    finally:
        dist.destroy()


def _train(req: Request) -> None:
    from supcon import driver
    from supcon.core import dist
    from supcon.core.stop import Interrupted
    from supcon.runs.seeds import summary_table

    try:
        results = driver.execute(req)
    except Interrupted as stop:
        if dist.is_main():
            print(f"stopped: progress saved in {stop.checkpoint}; continue with: {_resume_command(req)}",
                  file=sys.stderr)  # fmt: skip
        return
    if req.seeds is not None and dist.is_main():
        print(
            f"\nover seeds {req.seeds}: mean ± std\n{summary_table(results)}\n\nreport: {req.out}/report.md"
        )


def _print_result(req: Request, results: dict) -> None:
    from supcon.core import dist
    from supcon.evaluation.report import table

    if dist.is_main():
        print()
        print(table(results["rows"]))
        print(f"\nrun folder: {req.out}  (report.md, curves.png, metrics.jsonl, weights/)")


def _resume_command(req: Request) -> str:
    """A command that continues this run: the saved config is the base, so no other flag is needed."""
    parts = ["supcon", req.command]
    if req.seeds is not None:  # a repeat over seeds: continue them all
        from supcon.runs.seeds import format_seeds

        parts += ["--seeds", format_seeds(req.seeds)]
    if req.from_dir is not None:
        parts += ["--from", str(req.from_dir)]
    return " ".join([*parts, "--resume", "--out", str(req.out)])


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except UsageError as e:
        print(f"supcon: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("supcon: interrupted", file=sys.stderr)
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
