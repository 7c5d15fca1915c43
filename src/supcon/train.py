"""Training phases as plain functions: cross-entropy, contrastive pre-training, a classifier on a frozen
encoder.

Each phase goes through :func:`fit`, one loop read top to bottom: shuffle with a seeded generator,
index the uint8 dataset, step, log a JSON line per epoch, checkpoint atomically. A checkpoint
holds everything needed to continue exactly where the run stopped (model, optimizer, scheduler,
scaler, RNG states, the position inside the epoch).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from supcon import dist
from supcon.augment import AugmentConfig, BatchAugment, save_view_grid
from supcon.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from supcon.config import Config, PhaseConfig
from supcon.datasets import ImageDataset
from supcon.encoders import build_encoder
from supcon.errors import UsageError
from supcon.heads import DropoutDenseHead, LinearHead, ProjectionHead
from supcon.loss import supcon_loss
from supcon.optim import build_optimizer, build_scheduler, scale_lr
from supcon.runtime import Runtime

PHASE_IDS = {"ce": 1, "pretrain": 2, "linear": 3}


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, checkpoint: Path):
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step, so the step in flight finishes
    and a checkpoint is written. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old: dict[int, object] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


@dataclass
class RunContext:
    cfg: Config
    rt: Runtime
    run_dir: Path
    resume: bool = False
    progress: bool = True
    stop_after: int | None = None  # stop cleanly (as on SIGTERM) once a phase has this many epochs
    stop: StopFlag = field(default_factory=StopFlag)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def logged_epochs(self, phase: str) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if r.get("phase") == phase]

    def truncate_log(self, phase: str, epochs: int) -> None:
        """Drop lines of ``phase`` past ``epochs`` (written after the checkpoint a resume starts from)."""
        path = self.run_dir / "metrics.jsonl"
        if not dist.is_main() or not path.is_file():
            return
        lines = path.read_text().splitlines()
        keep = [
            x
            for x in lines
            if x.strip() and not (json.loads(x).get("phase") == phase and json.loads(x)["epoch"] > epochs)
        ]
        path.write_text("".join(x + "\n" for x in keep))

    def log(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl as soon as an epoch ends (rank 0 only)."""
        if dist.is_main():
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------
# Models


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class ContrastiveModel(nn.Module):
    """Encoder + projection head; the loss sees the projection, evaluation the encoder's features."""

    def __init__(self, encoder: nn.Module, projection: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder(x))


def make_encoder(cfg: Config, data: ImageDataset) -> nn.Module:
    m = cfg.model
    return build_encoder(
        m.encoder,
        in_channels=data.channels,
        image_size=data.image_size,
        feature_dim=m.feature_dim,
        width=m.width,
        blocks=m.blocks,
    )


def make_head(cfg: Config, in_dim: int, num_classes: int) -> nn.Module:
    m = cfg.model
    if m.classifier == "linear":
        return LinearHead(in_dim, num_classes)
    return DropoutDenseHead(in_dim, num_classes, hidden=m.classifier_hidden, dropout=m.dropout)


def make_projection(cfg: Config, in_dim: int) -> nn.Module:
    m = cfg.model
    if m.projection == "none":
        return nn.Identity()
    return ProjectionHead(
        in_dim,
        m.projection_dim,
        hidden_dim=m.projection_hidden,
        kind=m.projection,
        batch_norm=m.projection_bn,
    )


AUGMENTS = ("none", "supcon", "crop-flip")


def make_augment(kind: str, rt: Runtime) -> BatchAugment | None:
    """The training-time augmentation of a phase; None = none (plain images, see ``Runtime.images``).

    "supcon" is the paper's pipeline (crop, flip, colour jitter, grayscale); "crop-flip" the lighter
    one used for cross-entropy baselines and linear probes. Normalisation follows the run's data.
    """
    if kind == "none":
        return None
    if kind not in AUGMENTS:
        raise UsageError(f"unknown augmentation {kind!r}; choose one of: {', '.join(AUGMENTS)}")
    norm = {"normalize": False} if rt.mean is None else {"normalize": True, "mean": rt.mean, "std": rt.std}
    extra = {"jitter_p": 0.0, "grayscale_p": 0.0} if kind == "crop-flip" else {}
    return BatchAugment(AugmentConfig(mode="supcon", **norm, **extra))


def prepare(model: nn.Module, rt: Runtime) -> nn.Module:
    model = model.to(rt.device)
    return model.to(memory_format=torch.channels_last) if rt.channels_last else model


def wrap_ddp(model: nn.Module, ctx: RunContext) -> nn.Module:
    """The module the training step calls: DistributedDataParallel over the process group when there is
    one, compiled with ``torch.compile`` when the config asks; the model itself otherwise.

    With ``sync_bn`` BatchNorm statistics are computed over the global batch (converted in place, so
    the unwrapped model that is checkpointed holds the same modules).
    """
    net = model
    if dist.world_size() > 1:
        if ctx.cfg.sync_bn:
            for name, child in list(model.named_children()):
                setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        device_ids = [ctx.rt.device.index] if ctx.rt.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return torch.compile(net) if ctx.cfg.compile else net


# ----------------------------------------------------------------------------------------------
# The loop


def _rng_state(rt: Runtime) -> dict:
    """This rank's global RNG states (dropout and anything else drawing from torch's default generator)."""
    state = {"torch": torch.get_rng_state()}
    if rt.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(rt.device)
    return state


def _set_rng_state(state: dict, rt: Runtime) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and rt.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], rt.device)


def fit(
    phase: str,
    pcfg: PhaseConfig,
    module: nn.Module,
    params: list[nn.Parameter],
    step: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]],
    n_train: int,
    ctx: RunContext,
    on_epoch_end: Callable[[int], dict] | None = None,
    global_loss: bool = False,
) -> list[dict]:
    """Run one phase. ``step(idx, aug_gen)`` returns (loss, number of correct predictions or None) for
    this rank's share ``idx`` of the global batch. ``module`` is what is checkpointed.

    ``global_loss``: the step returns the same global loss on every rank (SupCon with gather=True),
    whose backward gives each rank exactly its share of the global gradient. DDP averages gradients
    over ranks, so the loss is multiplied by the world size before backward to undo that average.
    A per-rank mean loss (cross-entropy) is weighted by the rank's share of the batch, which makes
    the average over ranks the mean over the global batch.
    """
    rt, cfg = ctx.rt, ctx.cfg
    world, rank = dist.world_size(), dist.rank()
    lr = scale_lr(pcfg.lr, pcfg.batch_size) if pcfg.scale_lr else pcfg.lr
    opt = build_optimizer(
        params, pcfg.optimizer, lr=lr, weight_decay=pcfg.weight_decay, momentum=pcfg.momentum, eps=pcfg.eps
    )
    steps_per_epoch = math.ceil(n_train / pcfg.batch_size)
    sched = build_scheduler(
        opt,
        pcfg.schedule,
        total_steps=steps_per_epoch * pcfg.epochs,
        warmup_steps=round(pcfg.warmup_epochs * steps_per_epoch),
    )
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype is torch.float16)
    # Data order agrees on every rank (same seed); augmentation differs per rank.
    g_data = torch.Generator().manual_seed(cfg.seed * 1009 + PHASE_IDS[phase])
    g_aug = torch.Generator(rt.device).manual_seed(cfg.seed * 7919 + PHASE_IDS[phase] * 131 + rank)
    epoch, first_step, history = 0, 0, []
    # Dropout masks differ per rank (each sees other samples); every rank starts from the same weights.
    torch.manual_seed(cfg.seed * 7919 + PHASE_IDS[phase] * 104729 + rank)

    ckpt_path = latest_checkpoint(ctx.checkpoints, phase) if ctx.resume else None
    if ctx.resume and ckpt_path is None and ctx.logged_epochs(phase):
        # The phase had started, yet its checkpoints are gone: never restart it silently from scratch.
        raise UsageError(
            f"cannot resume {phase}: no checkpoint in {ctx.checkpoints}, yet metrics.jsonl has its epochs"
        )
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        g_data.set_state(state["g_data"])
        g_aug.set_state(state["g_aug"][rank % len(state["g_aug"])])
        _set_rng_state(state["rng"][rank % len(state["rng"])], rt)
        epoch, first_step, history = state["epoch"], state["step"], state["history"]
        ctx.truncate_log(phase, epoch)
        if dist.is_main():
            print(
                f"resuming {phase} from {ckpt_path.name} (epoch {epoch + 1}, step {first_step})", flush=True
            )

    def save(ep: int, st: int, g_state: torch.Tensor) -> Path:
        g_aug_states = dist.all_gather_object(g_aug.get_state())
        rng_states = dist.all_gather_object(_rng_state(rt))
        path = ctx.checkpoints / (f"{phase}-e{ep:04d}.pt" if st == 0 else f"{phase}-e{ep:04d}.{st:06d}.pt")
        if dist.is_main():
            state = {
                "phase": phase,
                "config": cfg.to_dict(),
                "epoch": ep,
                "step": st,
                "history": history,
                "model": module.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "g_data": g_state,
                "g_aug": g_aug_states,  # one per rank
                "rng": rng_states,
            }
            save_checkpoint(state, path, keep=cfg.keep_checkpoints)
        return path

    while epoch < pcfg.epochs:
        # The permutation is drawn from this state; a mid-epoch checkpoint stores it to redraw it.
        g_state = g_data.get_state()
        perm = torch.randperm(n_train, generator=g_data)
        module.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=rt.device)
        correct_sum = torch.zeros((), device=rt.device, dtype=torch.long)
        seen = 0
        bar = tqdm(
            range(first_step, steps_per_epoch),
            desc=f"{phase} {epoch + 1}/{pcfg.epochs}",
            leave=False,
            disable=True if not (ctx.progress and dist.is_main()) else None,  # None: off when not a terminal
            dynamic_ncols=True,
        )
        for s in bar:
            idx = perm[s * pcfg.batch_size : (s + 1) * pcfg.batch_size]
            # Each rank takes a contiguous share of the global batch.
            local = idx.tensor_split(world)[rank] if world > 1 else idx
            loss, correct = step(local, g_aug)
            opt.zero_grad(set_to_none=True)
            if world > 1:
                # DDP averages gradients over ranks. A global loss is the same on every rank: undo the
                # average. A per-rank mean: weight it by the rank's share so that the average is the
                # mean over the global batch even when the shares differ (the last batch).
                loss_for_grad = loss * world if global_loss else loss * (world * len(local) / len(idx))
            else:
                loss_for_grad = loss
            scaler.scale(loss_for_grad).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss_sum += loss.detach() * len(local)
            if correct is not None:
                correct_sum += correct
            seen += len(local)
            if s % 20 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if _stop_requested(ctx):
                if s + 1 < steps_per_epoch:
                    raise Interrupted(save(epoch, s + 1, g_state))
                break
        bar.close()
        totals = dist.all_reduce_sum(
            torch.stack([loss_sum.float(), correct_sum.float(), torch.tensor(float(seen))])
        )
        seconds = time.perf_counter() - t0
        record = {"phase": phase, "epoch": epoch + 1, "loss": round(totals[0].item() / totals[2].item(), 6)}
        if phase != "pretrain":
            record["train_acc"] = round(totals[1].item() / totals[2].item(), 6)
        record["lr"] = sched.get_last_lr()[0]
        record["seconds"] = round(seconds, 3)
        if rt.device.type == "cuda":
            record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(rt.device) / 2**30, 3)
        if on_epoch_end is not None:
            record.update(on_epoch_end(epoch + 1))
        history.append(record)
        ctx.log(record)
        if dist.is_main() and ctx.progress:
            extra = "  ".join(f"{k}={v:.4f}" for k, v in record.items() if k.endswith("acc"))
            print(
                f"{phase} epoch {epoch + 1}/{pcfg.epochs}  loss={record['loss']:.4f}  {extra}  "
                f"{seconds:.1f}s",
                flush=True,
            )
        epoch, first_step = epoch + 1, 0
        path = save(epoch, 0, g_data.get_state())
        if epoch < pcfg.epochs and (_stop_requested(ctx) or epoch == ctx.stop_after):
            raise Interrupted(path)
    return history


def _stop_requested(ctx: RunContext) -> bool:
    # Every rank must agree to stop at the same step, or the next collective would hang.
    flag = torch.tensor(float(ctx.stop.requested))
    return bool(dist.all_reduce_sum(flag).item() > 0) if dist.world_size() > 1 else ctx.stop.requested


# ----------------------------------------------------------------------------------------------
# Evaluation helpers


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside, and afterwards every submodule back in its own mode (a frozen encoder inside a
    training classifier stays in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@torch.inference_mode()
def _batched(model: nn.Module, x: torch.Tensor, rt: Runtime, batch_size: int) -> list[torch.Tensor]:
    with eval_mode(model):
        out = []
        for i in range(0, len(x), batch_size):
            with rt.autocast():
                out.append(model(rt.images(x[i : i + batch_size])).float())
    return out


def extract_features(
    encoder: nn.Module, x: torch.Tensor, rt: Runtime, batch_size: int = 1024
) -> torch.Tensor:
    """Encoder features [N, D] (float32, on the device) of uint8 images [N, H, W, C], in eval mode."""
    out = _batched(encoder, x, rt, batch_size)
    return torch.cat(out) if out else torch.zeros(0, 0, device=rt.device)


def predict(model: nn.Module, x: torch.Tensor, rt: Runtime, batch_size: int = 1024) -> torch.Tensor:
    """Predicted class ids [N] of uint8 images (eval mode)."""
    out = _batched(model, x, rt, batch_size)
    return torch.cat(out).argmax(1).cpu() if out else torch.zeros(0, dtype=torch.long)


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred.cpu() == y.cpu()).float().mean()) if len(y) else float("nan")


@torch.inference_mode()
def knn_accuracy(
    bank: torch.Tensor,
    bank_y: torch.Tensor,
    query: torch.Tensor,
    query_y: torch.Tensor,
    k: int,
    temperature: float,
) -> float:
    """Weighted kNN on cosine similarity (as InstDisc/SupContrast monitors): votes exp(sim / T)."""
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    bank_y = bank_y.to(bank.device)
    num_classes = int(bank_y.max()) + 1
    k = min(k, len(bank))
    correct = 0
    for i in range(0, len(query), 1024):
        sim = query[i : i + 1024] @ bank.T
        w, j = sim.topk(k, dim=1)
        votes = torch.zeros(len(w), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_y[j], (w / temperature).exp())
        correct += int((votes.argmax(1).cpu() == query_y[i : i + 1024].cpu()).sum())
    return correct / max(1, len(query))


# ----------------------------------------------------------------------------------------------
# Phases


@dataclass
class Split:
    """The training data of a run, after carving the validation split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


def _batch_labels(split: Split, idx: torch.Tensor, rt: Runtime) -> torch.Tensor:
    return split.train_y[idx].to(rt.device, non_blocking=True)


def _classifier_step(net: nn.Module, augment: BatchAugment | None, split: Split, rt: Runtime):
    """The cross-entropy step of a classifier trained end to end (experiment 1, fine-tuning)."""

    def step(idx, g):
        x = (
            augment(split.train_x[idx].to(rt.device), views=1, generator=g)
            if augment
            else rt.images(split.train_x[idx])
        )
        y = _batch_labels(split, idx, rt)
        with rt.autocast():
            logits = net(x)
        return _ce(logits, y), (logits.argmax(1) == y).sum()

    return step


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # A rank whose share of a last, tiny batch is empty still runs backward (DDP needs every rank);
    # the mean over no samples would be NaN, a zero with a graph adds nothing.
    return F.cross_entropy(logits.float(), y) if len(y) else logits.sum() * 0.0


def _val_acc(model: nn.Module, split: Split, rt: Runtime) -> dict:
    if len(split.val_y):
        return {"val_acc": round(accuracy(predict(model, split.val_x, rt), split.val_y), 6)}
    return {}


def train_ce(ctx: RunContext, data: ImageDataset, split: Split) -> Classifier:
    """Experiment 1: encoder and classifier trained together with softmax cross-entropy."""
    cfg, rt = ctx.cfg, ctx.rt
    encoder = make_encoder(cfg, data)
    model = prepare(Classifier(encoder, make_head(cfg, encoder.feature_dim, data.num_classes)), rt)
    return _train_end_to_end("ce", model, ctx, split)


def _train_end_to_end(phase: str, model: Classifier, ctx: RunContext, split: Split) -> Classifier:
    """Encoder and classifier trained together with cross-entropy (experiment 1, fine-tuning)."""
    pcfg: PhaseConfig = getattr(ctx.cfg, phase)
    net = wrap_ddp(model, ctx)
    step = _classifier_step(net, make_augment(pcfg.augment, ctx.rt), split, ctx.rt)
    params = list(model.parameters())
    fit(phase, pcfg, model, params, step, len(split.train_y), ctx, lambda e: _val_acc(model, split, ctx.rt))
    return model


def pretrain(ctx: RunContext, data: ImageDataset, split: Split) -> ContrastiveModel:
    """Experiment 2a: contrastive pre-training of the encoder (SupCon with labels, SimCLR without)."""
    cfg, rt = ctx.cfg, ctx.rt
    pcfg = cfg.pretrain
    encoder = make_encoder(cfg, data)
    model = prepare(ContrastiveModel(encoder, make_projection(cfg, encoder.feature_dim)), rt)
    net = wrap_ddp(model, ctx)
    augment = make_augment(pcfg.augment, rt)
    views = pcfg.views
    if augment is not None and dist.is_main():
        # A look at what the encoder is trained on: originals and their augmented views.
        pick = torch.randperm(len(split.train_y), generator=torch.Generator().manual_seed(cfg.seed))[:8]
        save_view_grid(split.train_x[pick], ctx.run_dir / "views.png", views=max(views, 4), augment=augment)
    use_labels = cfg.loss.method == "supcon"

    def step(idx, g):
        xb = split.train_x[idx].to(rt.device)
        if augment is not None:
            x = augment(xb, views=views, generator=g)  # [V*B, C, H, W], view-major
        else:
            x = rt.images(xb)
            x = x.repeat(views, 1, 1, 1) if views > 1 else x
        with rt.autocast():
            z = net(x)
        z = z.float().view(views, len(idx), -1).transpose(0, 1)  # [B, V, D]
        loss = supcon_loss(
            z,
            _batch_labels(split, idx, rt) if use_labels else None,
            temperature=cfg.loss.temperature,
            variant=cfg.loss.variant,
            chunk_size=cfg.loss.chunk_size,
            gather=dist.world_size() > 1,
        )
        return loss, None

    def on_epoch_end(epoch):
        if cfg.knn_every and (epoch % cfg.knn_every == 0 or epoch == pcfg.epochs):
            mon_x, mon_y = (split.val_x, split.val_y) if len(split.val_y) else (data.test_x, data.test_y)
            bank = extract_features(model.encoder, split.train_x, rt)
            q = extract_features(model.encoder, mon_x, rt)
            key = "val_knn_acc" if len(split.val_y) else "monitor_knn_acc"
            return {
                key: round(knn_accuracy(bank, split.train_y, q, mon_y, cfg.knn_k, cfg.knn_temperature), 6)
            }
        return {}

    fit(
        "pretrain",
        pcfg,
        model,
        list(model.parameters()),
        step,
        len(split.train_y),
        ctx,
        on_epoch_end,
        global_loss=True,
    )
    return model


def train_linear(ctx: RunContext, data: ImageDataset, split: Split, encoder: nn.Module) -> Classifier:
    """Experiment 2b: a classifier on the pre-trained encoder.

    By default the encoder is frozen (eval mode, no gradient) and only the classifier learns: the
    linear probe. Without augmentation the frozen encoder maps each image to the same features every
    epoch, so they are computed once and the classifier trains on them: the same optimisation, far
    cheaper. With ``linear.finetune`` the encoder and the classifier are trained together with
    cross-entropy, starting from the pre-trained weights (full fine-tuning).
    """
    cfg, rt = ctx.cfg, ctx.rt
    pcfg = cfg.linear
    augment = make_augment(pcfg.augment, rt)
    head = make_head(cfg, encoder.feature_dim, data.num_classes)
    if pcfg.finetune:
        # A copy: the pre-trained encoder stays as it was (the report maps both).
        model = prepare(Classifier(copy.deepcopy(encoder), head), rt)
        for p in model.parameters():
            p.requires_grad_(True)
        return _train_end_to_end("linear", model, ctx, split)

    encoder = prepare(encoder, rt).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    head = head.to(rt.device)
    model = Classifier(encoder, head)
    head_net = wrap_ddp(head, ctx)
    t0 = time.perf_counter()
    feats = extract_features(encoder, split.train_x, rt) if augment is None else None
    feature_seconds = time.perf_counter() - t0

    def step(idx, g):
        y = _batch_labels(split, idx, rt)
        if feats is not None:
            f = feats[idx.to(feats.device)]
        else:
            with torch.no_grad(), rt.autocast():
                f = encoder(augment(split.train_x[idx].to(rt.device), views=1, generator=g)).float()
        logits = head_net(f)
        return _ce(logits, y), (logits.argmax(1) == y).sum()

    def on_epoch_end(epoch):
        out = {}
        if epoch == 1 and feats is not None:
            out["feature_seconds"] = round(feature_seconds, 3)
        return out | _val_acc(model, split, rt)

    class _Frozen(nn.Module):
        # What fit() checkpoints and switches to train mode: the head only.
        def __init__(self):
            super().__init__()
            self.head = head

    fit("linear", pcfg, _Frozen(), list(head.parameters()), step, len(split.train_y), ctx, on_epoch_end)
    return model


def check_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to reuse a non-empty run folder unless asked; never delete a folder that isn't a run folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} exists and is not a folder")
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"nothing to resume in {run_dir}: it has no config.yaml")
        return
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise UsageError(f"run folder {run_dir} is not empty; use --overwrite to replace it or --resume")
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(
                f"refusing to overwrite {run_dir}: it is not a supcon run folder (no config.yaml)"
            )
