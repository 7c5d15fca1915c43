"""Repeats over seeds: one complete run folder per seed, then mean ± standard deviation.

``supcon compare --seeds 0,1,2 --out OUT`` (or ``supcon.run(..., seeds=[0, 1, 2])``) runs the
command once per seed in ``OUT/seed-N/`` (each a run folder of its own, resumable on its own), then
writes ``OUT/results.json`` and ``OUT/report.md``: per experiment the mean and sample standard
deviation (n - 1) of the test accuracy over the seeds and, for ``compare``, the paired difference
of each contrastive row minus cross-entropy, seed by seed, with its mean and a Student t
confidence interval (n - 1 degrees of freedom).

The statistics are plain functions (:func:`mean_std`, :func:`paired_difference`,
:func:`aggregate`); :func:`run_seeds` drives the runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from supcon.core import dist
from supcon.core.config import MAX_SEED
from supcon.core.errors import UsageError
from supcon.core.files import atomic_write
from supcon.core.schema import field, load_json, read_text, short

if TYPE_CHECKING:
    from supcon.core.stop import StopFlag

BASELINE = "cross-entropy"  # the row the paired differences of `compare` are taken against
LEVEL = 0.95


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``: distinct integers from 0 to
    ``MAX_SEED``."""
    seeds: list[int] = []
    for part in (s.strip() for s in str(text).split(",")):
        if not part:
            continue
        # int() of a 5000-digit string is itself refused by Python; past 20 digits is out of range.
        if len(part) > 41:
            raise UsageError(f"each seed must be an integer from 0 to {MAX_SEED}, got {short(text)}")
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise UsageError(
                f"--seeds takes integers or ranges such as 0,1,2 or 0-9, got {short(text)}"
            ) from None
        if not 0 <= first <= last <= MAX_SEED or last - first >= MAX_SEEDS or len(seeds) > MAX_SEEDS:
            raise UsageError(f"each seed must be an integer from 0 to {MAX_SEED}, got {short(part)}")
        seeds += range(first, last + 1)
    return check_seeds(seeds)


def format_seeds(seeds: Sequence[int]) -> str:
    """The shortest text :func:`parse_seeds` reads back as ``seeds``: runs of consecutive seeds as
    ranges (the resume command of a 1000-seed job stays one short line)."""
    parts, seeds = [], list(seeds)
    i = 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if j - i < 2 else f"{seeds[i]}-{seeds[j]}")
        parts += [str(seeds[j])] if j - i == 1 else []
        i = j + 1
    return ",".join(parts)


MAX_SEEDS = 100_000  # a repeat of more runs than this is a typo


def check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(
        isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED for s in seeds
    ):
        raise UsageError(f"seeds must be one or more integers from 0 to {MAX_SEED}, got {short(seeds)}")
    if len(seeds) > MAX_SEEDS:
        raise UsageError(f"at most {MAX_SEEDS} seeds, got {len(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds must be distinct, got {short(seeds)}")
    return seeds


def seed_dir(out: Path, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the deviation is None for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (scipy, a scikit-learn
    dependency)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict:
    """``a - b`` seed by seed: the differences, their mean and sample deviation, and the two-sided
    ``level`` confidence interval of the mean, ``mean ± t_{(1+level)/2, n-1} * std / sqrt(n)``
    (None for a single seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} vs {len(b)} values")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, std = mean_std(diffs)
    ci = None
    if std is not None:
        half = t_quantile((1 + level) / 2, len(diffs) - 1) * std / math.sqrt(len(diffs))
        ci = [mean - half, mean + half]
    return {"diffs": diffs, "mean": mean, "std": std, "n": len(diffs), "level": level, "ci": ci}


# What a result row is judged by over seeds: its headline (accuracy, or mAP for multi-label data)
# and the secondary numbers of the same row (long-tail groups, multi-label F1), when it has them.
HEADLINES = ("test_acc", "map")
SECONDARY = ("many_acc", "medium_acc", "few_acc", "micro_f1", "macro_f1")
LABELS = {
    "test_acc": "accuracy", "map": "mAP", "many_acc": "many", "medium_acc": "medium", "few_acc": "few",
    "micro_f1": "micro-F1", "macro_f1": "macro-F1",
}  # fmt: skip


def row_metrics(row: dict) -> dict[str, float]:
    """The numbers of one result row that are aggregated over seeds (fractions in [0, 1])."""
    flat = dict(row) | {f"{g}_acc": v for g, v in (row.get("group_acc") or {}).items()}
    return {k: flat[k] for k in (*HEADLINES, *SECONDARY) if flat.get(k) is not None}


def aggregate(command: str, per_seed: dict[int, dict]) -> dict:
    """The results of one command over seeds: ``per_seed`` maps a seed to its run's results dict
    (``{"rows": [{"experiment", "test_acc", ...}]}``). Rows keep the first seed's order; an
    experiment missing from some seed is an error (the runs differ). Each row gets the mean, sample
    deviation and per-seed values of its headline (``test_acc``, or ``map`` for multi-label data)
    and, under ``metrics``, of every number :func:`row_metrics` finds in all seeds."""
    seeds = sorted(per_seed)
    names = [r["experiment"] for r in per_seed[seeds[0]]["rows"]]
    values: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for seed in seeds:
        got = {r["experiment"]: row_metrics(r) for r in per_seed[seed]["rows"]}
        if set(got) != set(names):
            raise UsageError(f"seed {seed} reports {sorted(got)}, seed {seeds[0]} {sorted(names)}")
        for name in names:
            values[name].append(got[name])
    rows = []
    for name in names:
        common = [k for k in (*HEADLINES, *SECONDARY) if all(k in v for v in values[name])]
        if not common or common[0] not in HEADLINES:
            raise UsageError(f"{name!r} has no test accuracy or mAP in every seed")
        metrics = {}
        for key in common:
            per = [v[key] for v in values[name]]
            mean, std = mean_std(per)
            metrics[key] = {"mean": mean, "std": std, "per_seed": per}
        key, top = common[0], metrics[common[0]]
        row = {"experiment": name, "metric": key, key: top["mean"], f"{key}_std": top["std"], "n": len(seeds)}
        rows.append(row | {"per_seed": top["per_seed"], "metrics": metrics})
    paired = []
    if command == "compare" and BASELINE in values:
        base = {r["experiment"]: r for r in rows}[BASELINE]
        for r in rows:
            if r["experiment"] != BASELINE and r["metric"] == base["metric"]:
                diff = paired_difference(r["per_seed"], base["per_seed"])
                paired.append({"a": r["experiment"], "b": BASELINE, "metric": r["metric"], **diff})
    title = f"supcon {command} over seeds {', '.join(map(str, seeds))}"
    runs = {str(s): f"seed-{s}" for s in seeds}
    return {"title": title, "seeds": seeds, "runs": runs, "rows": rows, "paired": paired}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def report_text(results: dict) -> str:
    """``report.md`` of an aggregate: the table of means ± deviations, the paired differences."""
    n = len(results["seeds"])
    runs = ", ".join(f"`{d}/`" for d in results["runs"].values())
    lines = [
        f"# {results['title']}",
        "",
        f"{n} runs, one folder each: {runs}.",
        "",
        "Test results (%), mean ± sample standard deviation (n - 1) over seeds:",
        "",
        summary_table(results),
    ]
    for p in results["paired"]:
        ci = "n/a (one seed)" if p["ci"] is None else f"[{_pct(p['ci'][0])}, {_pct(p['ci'][1])}]"
        lines += [
            "",
            f"Paired difference of {LABELS[p.get('metric', 'test_acc')]}, {p['a']} − {p['b']} "
            "(percentage points, same seed):",
            "",
            f"- per seed: {', '.join(_pct(d) for d in p['diffs'])}",
            f"- mean {_pct(p['mean'])} ± {_pct(p['std'])} (sample std); {100 * p['level']:.0f}% CI {ci} "
            f"(Student t, {p['n'] - 1} degrees of freedom)",
        ]
    return "\n".join(lines) + "\n"


def summary_table(results: dict) -> str:
    """The aggregate's rows as a Markdown table: per experiment its headline (mean ± std, per seed)
    and the mean ± std of its secondary numbers (long-tail groups, multi-label F1) when it has any."""
    rows = results["rows"]
    extra = [k for k in SECONDARY if any(k in r.get("metrics", {}) for r in rows)]
    head = ["experiment", "metric", "mean ± std", "per seed", *(LABELS[k] for k in extra)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        key, metrics = r.get("metric", "test_acc"), r.get("metrics", {})
        cells = [r["experiment"], LABELS[key], _mean_std(r[key], r[f"{key}_std"])]
        cells.append(", ".join(_pct(v) for v in r["per_seed"]))
        cells += [_mean_std(metrics[k]["mean"], metrics[k]["std"]) if k in metrics else "" for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(mean: float, std: float | None) -> str:
    return f"{_pct(mean)} ± {_pct(std)}"


RunOne = Callable[[int, Path, bool], dict]  # (seed, its run folder, resume it) -> its results dict


def run_seeds(
    command: str,
    seeds: Sequence[int],
    out: Path,
    run_one: RunOne,
    *,
    resume: bool = False,
    stop: StopFlag | None = None,
) -> dict:
    """Run ``command`` once per seed in ``out/seed-N`` with ``run_one``, then aggregate.

    With ``resume``: a seed whose folder holds ``results.json`` is finished and read back, one whose
    folder holds a run is resumed, any other starts. Writes ``out/results.json`` and
    ``out/report.md`` (rank 0) and returns the aggregate. A ``stop`` request (SIGINT/SIGTERM) that
    the seed's own training loop did not act on (it came during data loading, evaluation or the
    report) ends the job before the next seed with :class:`Interrupted`.
    """
    seeds, out = check_seeds(seeds), Path(out)
    if (out / "config.yaml").is_file():
        raise UsageError(f"{out} is a single run's folder; --seeds needs a folder of its own (seed-N inside)")
    per_seed = {}
    for seed in seeds:
        if stop is not None and stop.requested:
            from supcon.core.stop import Interrupted  # here: --seeds parsing imports no torch

            raise Interrupted(out)
        folder = seed_dir(out, seed)
        done = folder / "results.json"
        if resume and done.is_file():
            per_seed[seed] = _finished(done)
            continue
        per_seed[seed] = run_one(seed, folder, resume and (folder / "config.yaml").is_file())
    if not dist.is_main():  # the other ranks of a distributed run hold no accuracies
        return {"title": f"supcon {command} over seeds", "seeds": seeds, "rows": [], "paired": []}
    results = aggregate(command, per_seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=1)), ("report.md", report_text(results))):
        atomic_write(out / name, lambda tmp, text=text: Path(tmp).write_text(text))
    return results


def _finished(path: Path) -> dict:
    """A finished seed's ``results.json`` read back, checked as far as :func:`aggregate` reads it."""
    results = load_json(read_text(path, "results"), str(path))
    rows = field(results, "rows", "list", str(path))
    for i, row in enumerate(rows):
        field(row, f"rows[{i}].experiment", "str", str(path))
        field(row, f"rows[{i}].group_acc", "mapping", str(path), optional=True)
        for key in (*HEADLINES, *SECONDARY):
            field(row, f"rows[{i}].{key}", "number", str(path), optional=True)
    return results


def fresh_seed_preset(command: str, out: Path, preset: str | None) -> str | None:
    """The preset of a seed that starts while the repeat resumes: a started seed's saved config
    (the flags of the first call are not repeated on ``--resume``), unless a preset is given or the
    command takes its config from ``--from``."""
    if preset is not None or command == "linear":
        return preset
    started = sorted(Path(out).glob("seed-*/config.yaml"))
    return str(started[0]) if started else None


def seed_source(from_dir: Path | None, seed: int) -> Path | None:
    """``--from`` for one seed: ``from_dir/seed-N`` when ``from_dir`` is a folder of seeds (so each
    seed's classifier trains on the encoder pre-trained with that seed), else ``from_dir``."""
    if from_dir is None or (Path(from_dir) / "config.yaml").is_file():
        return from_dir
    candidate = seed_dir(from_dir, seed)
    return candidate if (candidate / "config.yaml").is_file() else from_dir
