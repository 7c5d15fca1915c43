"""The training loop: :func:`fit`, one function read top to bottom, and its small named helpers.

A phase hands the loop a :class:`Phase`: the module to checkpoint, the parameters to optimise and a
``step`` that computes the loss of this rank's share of a global batch. The loop shuffles with a
seeded generator, steps, logs a JSON line per epoch and checkpoints atomically. A checkpoint holds
everything needed to continue exactly where the run stopped (model, optimizer, scheduler, scaler,
the random streams of every rank, the position inside the epoch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from supcon.core import dist
from supcon.core.config import PhaseConfig
from supcon.core.errors import UsageError
from supcon.core.stop import Interrupted
from supcon.data.prefetch import Prefetch, Prepare, TrainBatch
from supcon.train.collapse import warn_if_collapsed
from supcon.train.context import Run
from supcon.train.optim import build_optimizer, build_scheduler, scale_lr
from supcon.train.rng import Streams, restore_streams

PHASE_IDS = {"ce": 1, "pretrain": 2, "linear": 3}
CHECK_EVERY = 20  # steps between host reads of the running loss (progress bar, divergence check)
STOP_CHECK_EVERY = 16  # steps between the ranks' agreement on a stop request (a collective)


class StepOut(NamedTuple):
    loss: torch.Tensor  # the value to log: this rank's mean loss, or the global loss
    backward: torch.Tensor  # what to differentiate: the loss scaled for DDP's gradient average
    correct: torch.Tensor | None = None  # correct predictions in this rank's share
    negatives: torch.Tensor | None = None  # contrastive steps: [sum, number] of negative-pair cosines


Step = Callable[[TrainBatch, int, torch.Generator], StepOut]


@dataclass
class Phase:
    name: str  # "ce", "pretrain" or "linear"
    cfg: PhaseConfig
    module: nn.Module  # what is checkpointed and switched to train mode
    params: list[nn.Parameter]
    step: Step  # step(this rank's batch, global batch size, augmentation generator)
    n_train: int
    on_epoch_end: Callable[[int], dict] | None = None  # evaluation for the epoch record (rank 0)
    # An epoch's indices [n_train] from the data-order generator (supcon.data.sampler); None: a shuffle.
    order: Callable[[torch.Generator], torch.Tensor] | None = None
    prepare: Prepare | None = None  # reads a batch's images ahead, in the background (stored data)
    after_step: Callable[[], None] | None = None  # runs after each optimizer step (a momentum update)


class Diverged(UsageError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def ddp_global(loss: torch.Tensor) -> torch.Tensor:
    """For a loss every rank computes over the global batch (SupCon with ``gather=True``): its
    backward gives each rank exactly its share of the gradient, and DDP's average over ranks must
    be undone."""
    return loss * dist.world_size() if dist.world_size() > 1 else loss


def ddp_share(loss: torch.Tensor, n_local: int, n_global: int) -> torch.Tensor:
    """For a rank's mean over its share: weighted by the share, DDP's average over ranks is the mean
    over the global batch even when the shares differ (the last batch)."""
    world = dist.world_size()
    return loss * (world * n_local / n_global) if world > 1 else loss


@dataclass
class _State:
    epoch: int = 0
    step: int = 0  # first step of the epoch in progress (non-zero after a mid-epoch resume)
    history: list[dict] = field(default_factory=list)
    # The epoch in progress's sums over its steps before ``step`` (all ranks summed): a resumed
    # epoch's record then covers the whole epoch, not only the steps after the resume.
    partial: dict | None = None


@dataclass
class _Totals:
    loss: torch.Tensor
    correct: torch.Tensor
    seen: int = 0
    classifies: bool = False  # the steps count correct predictions (a training accuracy exists)
    data_wait: float | None = None  # seconds the steps waited for prefetched batches
    negatives: torch.Tensor | None = None  # summed StepOut.negatives (contrastive phases)


def _optimization(phase: Phase, steps_per_epoch: int):
    pc = phase.cfg
    lr = scale_lr(pc.lr, pc.batch_size) if pc.scale_lr else pc.lr
    opt = build_optimizer(
        phase.params, pc.optimizer, lr=lr, weight_decay=pc.weight_decay, momentum=pc.momentum, eps=pc.eps
    )
    sched = build_scheduler(
        opt,
        pc.schedule,
        total_steps=steps_per_epoch * pc.epochs,
        warmup_steps=round(pc.warmup_epochs * steps_per_epoch),
    )
    return opt, sched


def fit(phase: Phase, run: Run) -> list[dict]:
    """Train ``phase`` to its last epoch (or resume it); returns the per-epoch records."""
    pc, rt = phase.cfg, run.rt
    if phase.n_train < 1:
        raise UsageError(f"{phase.name}: no training images")
    steps = math.ceil(phase.n_train / pc.batch_size)
    opt, sched = _optimization(phase, steps)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype is torch.float16)
    streams = Streams.for_rank(run.cfg.seed, PHASE_IDS[phase.name], dist.rank(), rt.device)
    state = _resume(phase, run, opt, sched, scaler, streams)
    parts = (opt, sched, scaler, streams)
    while state.epoch < pc.epochs:
        g_state = streams.data.get_state()  # the permutation is redrawn from it on a mid-epoch resume
        g = streams.data
        perm = phase.order(g) if phase.order else torch.randperm(phase.n_train, generator=g)
        t0 = time.perf_counter()
        totals = _run_epoch(phase, run, perm, state, parts, g_state)
        record = _epoch_record(phase, run, totals, sched, time.perf_counter() - t0, state)
        state.history.append(record)
        run.log.append(record)
        state.epoch, state.step, state.partial = state.epoch + 1, 0, None
        last = state.epoch == pc.epochs
        stopping = not last and (_stop_agreed(run) or state.epoch == run.stop_after)
        if last or stopping or state.epoch % run.cfg.checkpoint_every == 0:
            path = _save(phase, run, state, parts, streams.data.get_state())
            if stopping:
                raise Interrupted(path)
    return state.history


def _run_epoch(phase: Phase, run: Run, perm, state: _State, parts, g_state) -> _Totals:
    opt, sched, scaler, streams = parts
    pc, rt = phase.cfg, run.rt
    steps = math.ceil(phase.n_train / pc.batch_size)
    phase.module.train()
    feed = _prefetch(phase, run, perm, state.epoch, steps)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
        perm = perm.to(rt.device)
    totals = _start_totals(rt.device, state.partial if state.step else None)
    bar = _progress(run, phase, state, steps)
    try:
        for s in bar:
            idx, local = _batch(perm, s, pc.batch_size)
            batch = TrainBatch(local, feed.take(s) if feed is not None else None)
            out = phase.step(batch, len(idx), streams.augment)
            opt.zero_grad(set_to_none=True)
            scaler.scale(out.backward).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            if phase.after_step is not None:
                phase.after_step()
            totals.loss += out.loss.detach() * len(local)
            if out.correct is not None:
                totals.correct += out.correct
                totals.classifies = True
            if out.negatives is not None:
                neg = totals.negatives
                totals.negatives = out.negatives if neg is None else neg + out.negatives
            totals.seen += len(local)
            if s % CHECK_EVERY == 0:
                _check_running_loss(phase, run, state, totals, s, bar, sched)
            if _stop_now(run, s, steps):
                if s + 1 < steps:
                    _check_running_loss(phase, run, state, totals, s, None, sched)
                    at = _State(state.epoch, s + 1, state.history, _partial(totals))
                    raise Interrupted(_save(phase, run, at, parts, g_state))
                break
    finally:
        if feed is not None:
            feed.close()
            totals.data_wait = feed.wait_seconds
    bar.close()
    return totals


def _start_totals(device: torch.device, partial: dict | None) -> _Totals:
    """Zero sums, or on rank 0 the sums of a resumed epoch's steps before the resume (they were
    summed over all ranks when saved, so the other ranks start from zero)."""
    totals = _Totals(torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))
    if partial is None or not dist.is_main():
        return totals
    totals.loss += partial["loss"]
    totals.correct += partial["correct"]
    totals.seen, totals.classifies = partial["seen"], partial["classifies"]
    if partial["negatives"] is not None:
        totals.negatives = torch.tensor(partial["negatives"], device=device)
    return totals


def _partial(totals: _Totals) -> dict:
    """The running sums of the epoch so far, summed over ranks (a collective), for a mid-epoch
    checkpoint."""
    neg = totals.negatives if totals.negatives is not None else totals.loss.new_zeros(2)
    seen = torch.tensor(float(totals.seen), device=totals.loss.device)
    summed = dist.all_reduce_sum(
        torch.stack([totals.loss.float(), totals.correct.float(), seen, *neg.float()])
    )
    loss, correct, n, neg_sum, neg_n = host_read(summed)
    return {
        "loss": loss, "correct": int(correct), "seen": int(n), "classifies": totals.classifies,
        "negatives": [neg_sum, neg_n] if totals.negatives is not None else None,
    }  # fmt: skip


def _batch(perm: torch.Tensor, s: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``s``'s global batch and this rank's contiguous share of it."""
    idx = perm[s * batch_size : (s + 1) * batch_size]
    world = dist.world_size()
    return idx, (idx.tensor_split(world)[dist.rank()] if world > 1 else idx)


def _prefetch(phase: Phase, run: Run, perm: torch.Tensor, epoch: int, steps: int) -> Prefetch | None:
    if phase.prepare is None:
        return None
    seed = (run.cfg.seed, PHASE_IDS[phase.name], epoch, dist.rank())
    return Prefetch(phase.prepare, lambda s: _batch(perm, s, phase.cfg.batch_size)[1], seed, steps)


def _progress(run: Run, phase: Phase, state: _State, steps: int):
    return tqdm(
        range(state.step, steps),
        desc=f"{phase.name} {state.epoch + 1}/{phase.cfg.epochs}",
        leave=False,
        disable=True if not (run.progress and dist.is_main()) else None,  # None: off when not a terminal
        dynamic_ncols=True,
    )


def host_read(t: torch.Tensor) -> list[float]:
    """The loop's only reads of device values on the host (each one waits for the device). A
    device-free dry run replaces this function."""
    return t.detach().reshape(-1).tolist()


def _check_running_loss(phase: Phase, run: Run, state: _State, totals: _Totals, s: int, bar, sched) -> None:
    """One host read of the running loss: for the progress bar, and to stop a run that diverged."""
    quiet = bar is None or bar.disable
    if quiet and run.rt.device.type != "cpu" and s % (CHECK_EVERY * 5):
        return  # on GPUs without a progress bar, read back (a host sync) less often
    mean = host_read(totals.loss)[0] / max(totals.seen, 1)
    if not math.isfinite(mean):
        _diverged(phase, run, state, s, mean, sched)
    if bar is not None and not bar.disable:
        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")


def _diverged(phase: Phase, run: Run, state: _State, s, loss: float, sched) -> None:
    from supcon.core.checkpoint import latest_checkpoint

    where = f"epoch {state.epoch + 1}" + (f", step {s + 1}" if s is not None else "")
    last = latest_checkpoint(run.checkpoints, phase.name)
    kept = f"last good checkpoint: {last}" if last is not None else "no checkpoint was saved before"
    raise Diverged(
        f"{phase.name} diverged: the loss is {loss} at {where} (lr {sched.get_last_lr()[0]:.3g}); "
        f"{kept}; lower the learning rate (--lr) or use --precision fp32"
    )


def _stop_now(run: Run, s: int, steps: int) -> bool:
    if dist.world_size() == 1:
        return run.stop.requested
    # Every rank must agree to stop at the same step, or the next collective would hang; asking the
    # others costs a collective and a host read, so only every few steps.
    if (s + 1) % STOP_CHECK_EVERY and s + 1 < steps:
        return False
    return _stop_agreed(run)


def _stop_agreed(run: Run) -> bool:
    """Whether any rank was asked to stop (all ranks call it at the same point)."""
    if dist.world_size() == 1:
        return run.stop.requested
    return host_read(run.stop.requested_anywhere(run.rt.device))[0] > 0


def _epoch_record(phase: Phase, run: Run, totals: _Totals, sched, seconds: float, state: _State) -> dict:
    rt = run.rt
    seen = torch.tensor(float(totals.seen), device=rt.device)
    neg = totals.negatives if totals.negatives is not None else seen.new_zeros(2)
    summed = dist.all_reduce_sum(
        torch.stack([totals.loss.float(), totals.correct.float(), seen, *neg.float()])
    )
    loss, correct, n, neg_sum, neg_n = host_read(summed)
    if not math.isfinite(loss):
        _diverged(phase, run, state, None, loss / n, sched)
    record = {"phase": phase.name, "epoch": state.epoch + 1, "loss": round(loss / n, 6)}
    if totals.classifies:
        record["train_acc"] = round(correct / n, 6)
    if totals.negatives is not None and neg_n > 0:
        record["neg_cos"] = round(neg_sum / neg_n, 6)
    record["lr"] = sched.get_last_lr()[0]
    record["seconds"] = round(seconds, 3)
    if totals.data_wait is not None:
        record["data_wait_seconds"] = round(totals.data_wait, 3)
    if rt.device.type == "cuda":
        record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(rt.device) / 2**30, 3)
    if phase.on_epoch_end is not None and dist.is_main():
        record.update(phase.on_epoch_end(state.epoch + 1))
    if dist.is_main():
        warn_if_collapsed(phase.name, state.history, record, phase.cfg.warmup_epochs)
    if dist.is_main() and run.progress:
        extra = "  ".join(f"{k}={v:.4f}" for k, v in record.items() if k.endswith("acc"))
        print(
            f"{phase.name} epoch {state.epoch + 1}/{phase.cfg.epochs}  loss={record['loss']:.4f}  {extra}  "
            f"{seconds:.1f}s",
            flush=True,
        )
    return record


def _checkpoint_name(phase: str, epoch: int, step: int) -> str:
    return f"{phase}-e{epoch:04d}.pt" if step == 0 else f"{phase}-e{epoch:04d}.{step:06d}.pt"


def _save(phase: Phase, run: Run, state: _State, parts, g_data_state: torch.Tensor):
    from supcon.core.checkpoint import save_checkpoint

    opt, sched, scaler, streams = parts
    rank_streams = dist.all_gather_object(streams.rank_state())
    path = run.checkpoints / _checkpoint_name(phase.name, state.epoch, state.step)
    if dist.is_main():
        ckpt = {
            "phase": phase.name,
            "config": run.cfg.to_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "history": state.history,
            "model": phase.module.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "g_data": g_data_state,
            "streams": rank_streams,  # one per rank: augmentation and global generators
            "partial": state.partial,
        }
        save_checkpoint(ckpt, path, keep=run.cfg.keep_checkpoints, locked=run.lock is not None)
    return path


def _first(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else ""


def _resume(phase: Phase, run: Run, opt, sched, scaler, streams: Streams) -> _State:
    from supcon.core.checkpoint import check_checkpoint, load_latest_checkpoint

    if not run.resume:
        return _State()
    found = load_latest_checkpoint(run.checkpoints, phase.name)
    if found is None:
        if run.log.epochs(phase.name):
            # The phase had started, yet its checkpoints are gone: never restart it silently.
            raise UsageError(
                f"cannot resume {phase.name}: no checkpoint in {run.checkpoints}, "
                "yet metrics.jsonl has its epochs"
            )
        return _State()
    path, ckpt = found
    check_checkpoint(ckpt, path, phase.name, phase.cfg.epochs)
    try:
        phase.module.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if scaler.is_enabled() and ckpt["scaler"]:  # empty when saved without fp16: start a fresh scale
            scaler.load_state_dict(ckpt["scaler"])
        notes = restore_streams(streams, ckpt, dist.rank())
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        # The metadata was checked; what remains is a state that does not fit this model/optimizer.
        raise UsageError(
            f"checkpoint {path} does not fit this run ({type(e).__name__}: {_first(e)})"
        ) from None
    state = _State(ckpt["epoch"], ckpt["step"], ckpt["history"], ckpt.get("partial"))
    run.log.truncate(phase.name, state.epoch)
    if dist.is_main():
        print(
            f"resuming {phase.name} from {path.name} (epoch {state.epoch + 1}, step {state.step})", flush=True
        )
    for note in notes:
        print(f"rank {dist.rank()}: {note}", flush=True)
    return state
