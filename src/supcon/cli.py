"""Command line: ``supcon compare | train-ce | pretrain | linear | eval``.

Configuration is layered: a preset (``--preset NAME|FILE``, default ``keras-example``), then the
explicit flags, then ``--set section.key=value`` for any other field. Bad input ends with one line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from supcon import dist
from supcon.config import PHASES, Config, load_preset, preset_names, set_value
from supcon.errors import UsageError

COMMANDS = {
    "compare": "the seed's two experiments: cross-entropy baseline vs contrastive pre-training + classifier",
    "train-ce": "experiment 1 alone: encoder + classifier trained with cross-entropy",
    "pretrain": "contrastive pre-training of the encoder (SupCon, or SimCLR with --method simclr)",
    "linear": "classifier on the frozen encoder of a pre-training run (--from DIR)",
    "eval": "test accuracy (and kNN) of the models in a run folder (--from DIR)",
}
# Which phases the phase-level flags (--epochs, --batch-size, --lr, ...) apply to.
COMMAND_PHASES = {"compare": PHASES, "train-ce": ("ce",), "pretrain": ("pretrain",), "linear": ("linear",)}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as for every other bad input
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="supcon", description="Supervised contrastive learning of image classifiers.")
    parser.add_argument("--version", action="version", version=f"supcon {__import__('supcon').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in ("linear", "eval"):
            p.add_argument(
                "--from",
                dest="from_dir",
                type=Path,
                required=True,
                metavar="DIR",
                help="run folder of a finished run (its config.yaml and weights/ are used)",
            )
        data = p.add_argument_group("data")
        data.add_argument("--dataset", help="registered dataset: digits, cifar10, cifar100, imagefolder")
        data.add_argument(
            "--data",
            metavar="PATH",
            help="image folder (PATH/train/<class>/*, PATH/test/<class>/*) or a CIFAR copy",
        )
        data.add_argument("--image-size", type=_positive_int, metavar="N", help="resize images to N x N")
        data.add_argument(
            "--val-fraction",
            type=float,
            metavar="F",
            help="share of the training set held out for validation (default from preset)",
        )
        if name == "eval":
            p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
            continue
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
        train = p.add_argument_group("training")
        train.add_argument("--epochs", type=_positive_int, metavar="N", help="epochs of each phase run here")
        train.add_argument("--batch-size", type=_positive_int, metavar="N", help="(global) batch size")
        train.add_argument("--lr", type=_positive_float, help="learning rate")
        train.add_argument("--seed", type=int, help="random seed (data order, initial weights, augmentation)")
        train.add_argument("--encoder", help="encoder from the registry (keras-cnn, resnet18, ...)")
        train.add_argument("--method", choices=["supcon", "simclr"], help="contrastive method")
        train.add_argument("--temperature", type=_positive_float, help="loss temperature")
        train.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N")
        train.add_argument(
            "--precision",
            choices=["auto", "fp32", "bf16", "fp16"],
            help="autocast precision (auto: bf16 on CUDA and on CPUs with native bf16)",
        )
        train.add_argument(
            "--sync-bn",
            action="store_true",
            default=None,
            help="synchronise BatchNorm over all processes (under torchrun)",
        )
        if name in ("linear", "compare"):
            train.add_argument(
                "--finetune",
                action="store_true",
                default=None,
                help="train the pre-trained encoder together with the classifier (default: frozen encoder)",
            )
        train.add_argument(
            "--stop-after",
            type=_positive_int,
            metavar="N",
            help="stop cleanly once a phase has N epochs (continue later with --resume)",
        )
        out = p.add_argument_group("output")
        out.add_argument("--out", type=Path, metavar="DIR", help="run folder (default runs/<command>-<time>)")
        out.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
        out.add_argument(
            "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
        )
        out.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return parser


def resolve_config(args: argparse.Namespace, base: Config | None = None) -> Config:
    """Preset (or ``base``), then explicit flags, then --set overrides."""
    if base is not None:
        cfg = base
        if args.preset:
            raise UsageError(
                "--preset cannot change the config of an existing run; drop it with --resume/--from"
            )
    else:
        cfg = load_preset(args.preset or "keras-example")
    if args.data is not None:
        cfg.data.path = args.data
        cfg.data.dataset = args.dataset  # None: recognised from the folder
    elif args.dataset is not None:
        cfg.data.dataset, cfg.data.path = args.dataset, None
    if args.image_size is not None:
        cfg.data.image_size = args.image_size
    if args.val_fraction is not None:
        cfg.data.val_fraction = args.val_fraction
    for phase in COMMAND_PHASES.get(args.command, ()):
        p = getattr(cfg, phase)
        for flag, key in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr")):
            if getattr(args, flag, None) is not None:
                setattr(p, key, getattr(args, flag))
    for flag, (section, key) in {
        "encoder": ("model", "encoder"),
        "method": ("loss", "method"),
        "temperature": ("loss", "temperature"),
    }.items():
        if getattr(args, flag, None) is not None:
            setattr(getattr(cfg, section), key, getattr(args, flag))
    if getattr(args, "seed", None) is not None:
        cfg.seed = args.seed
    if getattr(args, "device", None) is not None:
        cfg.device = args.device
    if getattr(args, "precision", None) is not None:
        cfg.precision = args.precision
    if getattr(args, "sync_bn", None):
        cfg.sync_bn = True
    if getattr(args, "finetune", None):
        cfg.linear.finetune = True
    for assignment in getattr(args, "set", []):
        set_value(cfg, assignment)
    return cfg


def _saved_config(run_dir: Path) -> Config:
    import yaml

    from supcon.config import from_dict

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UsageError(f"{run_dir} is not a supcon run folder (no config.yaml)")
    return from_dict(yaml.safe_load(path.read_text()) or {})


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from supcon import experiments as ex

    if args.command == "eval":
        if not args.from_dir.is_dir():
            raise UsageError(f"run folder does not exist: {args.from_dir}")
        cfg = _saved_config(args.from_dir)
        rows = ex.evaluate_run(cfg, args.from_dir, device=args.device or "auto")
        for r in rows:
            print(f"{r['experiment']}: {100 * r['test_acc']:.2f}%")
        return 0

    if args.command == "linear":
        if not args.from_dir.is_dir():
            raise UsageError(f"run folder does not exist: {args.from_dir}")
        base = _saved_config(args.from_dir) if not args.resume else None
    else:
        base = None
    run_dir = args.out or Path("runs") / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume:
        if args.out is None:
            raise UsageError("--resume needs --out DIR (the run folder to continue)")
        base = _saved_config(run_dir)
    cfg = resolve_config(args, base)
    # Under torchrun: join the process group (gloo on CPU, NCCL on CUDA); a no-op otherwise.
    device = dist.init_from_env(cfg.device)
    try:
        code = _train(args, cfg, run_dir, device)
        # Every rank finishes (rank 0 writes the last files) before any rank tears down its
        # connections: a rank that exits while a peer still talks to it can abort in gloo.
        dist.barrier()
        return code
    finally:
        dist.destroy()


def _train(args: argparse.Namespace, cfg: Config, run_dir: Path, device: str) -> int:
    from supcon import experiments as ex
    from supcon.report import table
    from supcon.train import Interrupted

    ctx = ex.open_run(
        cfg,
        run_dir,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.quiet,
        device=device,
        stop_after=args.stop_after,
    )
    try:
        with ctx.stop:
            results = ex.run_command(ctx, args.command, getattr(args, "from_dir", None))
    except Interrupted as stop:
        if not dist.is_main():
            return 0
        print(
            f"stopped: progress saved in {stop.checkpoint}; continue with the same command plus "
            f"--resume --out {run_dir}",
            file=sys.stderr,
        )
        return 0
    if not dist.is_main():
        return 0
    print()
    print(table(results["rows"]))
    print(f"\nrun folder: {run_dir}  (report.md, curves.png, metrics.jsonl, weights/)")
    return 0


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
