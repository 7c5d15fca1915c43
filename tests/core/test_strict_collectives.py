"""Strict collectives: NCCL's rules checked under gloo on the CPU, so CPU tests catch GPU failures."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import _strict_worker as worker
import supcon.core.dist as sdist
from launch import spawn
from supcon.core.dist import free_port

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("strict")
    spawn(worker.run, (free_port(), str(outdir)), worker.WORLD, 120)
    return [torch.load(outdir / f"rank{r}.pt") for r in range(worker.WORLD)]


def test_environment_switches_it_on_with_the_backends_device(results):
    assert [r["env_device"] for r in results] == ["cpu", "cpu"]


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("uneven_gather", r"all_gather: the tensor differs between ranks .*by rank \[\(2, 3\), \(2, 4\)"),
        ("uneven_reduce", r"all_reduce: the tensor differs between ranks \(shapes by rank \[\(1,\), \(2,"),
        ("dtype_reduce", r"all_reduce: the tensor differs between ranks .*dtype"),
        ("wrong_device", "all_reduce: tensors on cpu, expected on cuda"),
    ],
)
def test_violations_raise_on_every_rank(results, key, match):
    for res in results:
        assert res[key] is not None
        assert re.search(match, res[key]), res[key]


def test_a_violation_on_one_rank_raises_on_all(results):
    first, second = (r["wrong_device_one_rank"] for r in results)
    assert first == "all_gather: tensors on cpu, expected on cuda (strict mode)"
    assert second == "all_gather: rank(s) [0] passed tensors off their compute device (strict mode)"


def test_loss_rejects_differing_feature_sizes_on_every_rank(results):
    for res in results:
        assert "same number of views and feature size" in res["loss_dims"]
        assert "[[3, 2, 4], [3, 2, 5]]" in res["loss_dims"]


def test_correct_use_passes(results):
    rows = torch.arange(9.0)
    for rank, res in enumerate(r["ok"] for r in results):
        torch.testing.assert_close(res["gathered"], torch.cat([rows[:3], rows[:6]]).reshape(3, 3))
        torch.testing.assert_close(res["grad"], torch.full((rank + 1, 3), 2.0))
        assert res["sizes"] == [10, 11]
        assert res["objects"] == [{"rank": 0}, {"rank": 1}]
        assert res["sum"].tolist() == [2.0]


@pytest.mark.parametrize(
    ("env", "want"), [(None, None), ("0", None), ("1", "cpu"), ("cuda", "cuda"), ("meta", "meta")]
)
def test_strict_device_from_the_environment(monkeypatch, env, want):
    monkeypatch.setattr(sdist, "_strict", sdist._UNSET)
    if env is None:
        monkeypatch.delenv(sdist.STRICT_ENV, raising=False)
    else:
        monkeypatch.setenv(sdist.STRICT_ENV, env)
    assert sdist.strict_device() == (None if want is None else torch.device(want))
    sdist.set_strict(None)  # the function overrides the environment
    assert sdist.strict_device() is None
    sdist.set_strict("cpu")
    assert sdist.strict_device() == torch.device("cpu")


def test_single_process_helpers_ignore_strict_mode(monkeypatch):
    # Without a process group there is no collective to check.
    monkeypatch.setattr(sdist, "_strict", torch.device("cuda"))
    assert sdist.all_gather_sizes(3) == [3]
    assert sdist.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]
