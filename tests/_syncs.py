"""Host waits per step of one training epoch on the bundled digits, counted on the CPU."""

from supcon.core.config import Config, set_values
from supcon.core.runtime import resolve_runtime
from supcon.data.datasets import load_split
from supcon.train import loop, phases
from supcon.train.context import Run
from sync_counter import SyncCounter

STEPS = 40  # two of the loop's running-loss reads (every loop.CHECK_EVERY steps) and the epoch end


def epoch_syncs(tmp_path, monkeypatch, command: str, overrides: dict) -> tuple[int, dict]:
    cfg = Config()
    set_values(cfg, {"data.dataset": "digits", "precision": "fp32", **overrides})
    rt = resolve_runtime("cpu", "fp32", True)
    data, split = load_split(cfg.data, cfg.seed, progress=False)
    phase_cfg = getattr(cfg, "pretrain" if command == "pretrain" else "ce")
    phase_cfg.batch_size = len(split.train_y) // STEPS + 1
    phase_cfg.epochs = 1
    monkeypatch.setattr(loop, "_save", lambda *a, **k: tmp_path / "not-saved.pt")
    run = Run(cfg, rt, tmp_path, progress=False)
    real_fit = loop.fit
    counted = {}

    def fit(phase, run):
        with SyncCounter() as c:
            real_fit(phase, run)
        counted.update(total=c.total, counts=dict(c.counts))

    monkeypatch.setattr(phases, "fit", fit)
    getattr(phases, command)(run, data, split)
    steps = -(-len(split.train_y) // phase_cfg.batch_size)
    return counted["total"] / steps, counted["counts"]
