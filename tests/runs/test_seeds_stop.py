"""A stop request (SIGTERM, one Ctrl-C) ends a repeat over seeds at the next safe point, wherever it
arrives: in a seed's training loop, its data loading, its evaluation or report, or between seeds."""

import os
import signal

import pytest

from supcon import experiments
from supcon.cli import main
from supcon.core.stop import Interrupted, StopFlag
from supcon.runs.seeds import run_seeds

ARGS = [
    "train-ce",
    "--dataset",
    "digits",
    "--epochs",
    "1",
    "--batch-size",
    "256",
    "--precision",
    "fp32",
    "--quiet",
]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_request_between_seeds_ends_the_job(tmp_path, sig):
    calls = []

    def one(seed, folder, resume):
        calls.append(seed)
        os.kill(os.getpid(), sig)  # arrives after this seed's training loop
        return {"rows": [{"experiment": "cross-entropy", "test_acc": 0.5}]}

    stop = StopFlag()
    with stop, pytest.raises(Interrupted):
        run_seeds("train-ce", [0, 1, 2], tmp_path / "out", one, stop=stop)
    assert calls == [0]
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_flag_entered_twice_keeps_its_request_and_handlers(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    stop = StopFlag()
    with stop:
        with stop:  # one seed's run
            pass
        os.kill(os.getpid(), signal.SIGTERM)  # between two runs: still caught
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("where", ["finish", "load_split"])
def test_sigterm_outside_the_training_loop_stops_the_cli_repeat(tmp_path, monkeypatch, capsys, where):
    real = getattr(experiments, where)

    def signalled(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # during the report, or during data loading
        return real(*a, **k)

    monkeypatch.setattr(experiments, where, signalled)
    monkeypatch.setattr("supcon.evaluation.retrieval_report.plot_tsne", lambda maps, y, c, path, seed: path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([*ARGS, "--seeds", "0,1,2", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 0 and "stopped: progress saved in" in err and "--resume" in err
    assert (out / "seed-0").is_dir() and not (out / "seed-1").exists()
    assert not (out / "results.json").exists()


def test_seed_ranges_read_back_and_resume_commands_stay_short():
    from supcon.core.errors import UsageError
    from supcon.runs.seeds import format_seeds, parse_seeds

    assert parse_seeds("0-3,7, 9-10") == [0, 1, 2, 3, 7, 9, 10]
    for seeds in ([0, 1, 2, 3, 7, 9, 10], list(range(1000)), [5], [1, 3, 5], [4, 5]):
        assert parse_seeds(format_seeds(seeds)) == seeds
    assert format_seeds(range(1000)) == "0-999"
    for bad in ("3-1", "0-99999999999", "1-2-3", "-", "0-4294967296", "9" * 50, "0-5,3"):
        with pytest.raises(UsageError):
            parse_seeds(bad)
