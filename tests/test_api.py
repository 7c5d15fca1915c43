import json

import pytest

import supcon


@pytest.mark.slow
def test_python_api_runs_an_experiment(tmp_path):
    out = tmp_path / "run"
    overrides = {"data.dataset": "digits", "ce.epochs": 1, "ce.batch_size": 256, "precision": "fp32"}
    results = supcon.run("train-ce", "keras-example", out, overrides=overrides, progress=False)
    assert results["rows"][0]["experiment"] == "cross-entropy"
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"][0]["test_acc"] == results["rows"][0]["test_acc"]
    assert "epochs: 1" in (out / "config.yaml").read_text()


def test_loss_is_exported():
    import torch

    f = torch.randn(8, 2, 4)
    assert torch.isfinite(supcon.supcon_loss(f, torch.arange(8) % 3))
    assert isinstance(supcon.SupConLoss(), torch.nn.Module)


def _denormal_survives() -> bool:
    import torch

    return (torch.tensor([1e-39]) * 1.0).item() != 0.0


@pytest.mark.slow
def test_every_command_is_callable_from_python_and_the_api_leaves_the_process_alone(tmp_path):
    import torch

    from supcon.cli import TOOLS, build_parser
    from supcon.commands import COMMANDS

    # The command line's subcommands are exactly the API's commands and the tools that use a run.
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS) | set(TOOLS)
    torch.set_flush_denormal(False)
    out = tmp_path / "run"
    overrides = {"data.dataset": "digits", "ce.epochs": 1, "precision": "fp32"}
    trained = supcon.run("train-ce", out=out, overrides=overrides, progress=False)
    assert _denormal_survives()  # no process-wide CPU tuning unless asked
    evaluated = supcon.run("eval", from_dir=out, device="cpu")
    assert evaluated["rows"][0]["test_acc"] == trained["rows"][0]["test_acc"]
    # eval recomputes the run's retrieval block from the saved weights
    assert set(evaluated["retrieval"]["encoders"]) == {"cross-entropy encoder"}
    got, saved = evaluated["retrieval"]["encoders"], trained["retrieval"]["encoders"]
    assert got["cross-entropy encoder"] == pytest.approx(saved["cross-entropy encoder"])
    supcon.run("train-ce", out=out, overrides={**overrides, "tune_cpu": True}, overwrite=True, progress=False)
    try:
        assert not _denormal_survives()
    finally:
        torch.set_flush_denormal(False)


def test_usage_error_is_a_value_error_and_public():
    from supcon.core.errors import UsageError

    assert issubclass(UsageError, ValueError) and supcon.UsageError is UsageError


def test_device_for_a_training_command_is_not_ignored(tmp_path):
    # device reaches the config: an impossible one is refused before anything runs.
    with pytest.raises(supcon.UsageError, match="meta"):
        supcon.run("train-ce", out=tmp_path / "r", device="meta", overrides={"data.dataset": "digits"})
    assert not (tmp_path / "r").exists()
