"""The driver: one path from a request (the command line's or supcon.run's) to a run."""

from pathlib import Path

import pytest

from supcon.core.errors import UsageError
from supcon.driver import Request, check, for_seed, resolve_config


def test_overrides_then_assignments_then_the_seed():
    req = Request(
        "compare", overrides={"ce.lr": 0.5, "seed": 3}, assignments=["ce.lr=0.25"], seed=7, tune_cpu=True
    )
    cfg = resolve_config(req)
    assert (cfg.ce.lr, cfg.seed, cfg.name, cfg.tune_cpu) == (0.25, 7, "keras-example", True)
    assert resolve_config(Request("compare", preset="cpu-fast")).name == "cpu-fast"


def test_check_refuses_what_cannot_run_and_decides_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="unknown command 'fit'"):
        check(Request("fit"))
    with pytest.raises(UsageError, match="eval needs --from"):
        check(Request("eval"))
    with pytest.raises(UsageError, match="--resume needs --out"):
        check(Request("compare", resume=True))
    assert check(Request("compare")).out.parent == Path("runs")
    assert check(Request("eval", from_dir=tmp_path)).out is None  # eval writes no run folder


def test_for_seed_gets_its_folder_seed_and_source(tmp_path):
    (tmp_path / "pre" / "seed-2").mkdir(parents=True)
    (tmp_path / "pre" / "seed-2" / "config.yaml").write_text("name: x\n")
    req = Request("linear", out=tmp_path / "out", from_dir=tmp_path / "pre", seeds=[1, 2], resume=True)
    one = for_seed(req, 2)
    assert (one.out, one.seed, one.seeds, one.from_dir) == (
        tmp_path / "out" / "seed-2",
        2,
        None,
        tmp_path / "pre" / "seed-2",
    )
    assert one.resume is False  # its folder holds no run yet
    assert req.out == tmp_path / "out"  # the request itself is unchanged
