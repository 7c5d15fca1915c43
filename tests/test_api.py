import json

import supcon


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
