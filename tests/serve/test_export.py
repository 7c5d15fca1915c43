import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from _trained import digits_test_images  # tests/ is on sys.path under pytest
from supcon.core.config import from_dict
from supcon.core.errors import UsageError
from supcon.models.build import build_encoder_for
from supcon.serve import export as export_mod
from supcon.serve.export import export_run
from supcon.serve.inference import _shape_only

# torch.jit.load is deprecated in favour of torch.export; TorchScript files are still an export format.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@pytest.fixture(scope="module")
def images():
    """Real digit images, uint8 [9, 16, 16, 3]."""
    return digits_test_images(9)[0]


def test_torchscript_matches_pytorch_at_any_batch_size(run, model, images, tmp_path):
    out = export_run(run, "torchscript", "encoder", tmp_path / "enc.pt")
    ts = torch.jit.load(str(out))
    with torch.no_grad():
        for x in (images, images[:1], images[3:7]):
            np.testing.assert_allclose(ts(x).numpy(), model.embed(x), atol=1e-4)
    clf = torch.jit.load(str(export_run(run, "torchscript", "classifier", tmp_path / "clf.pt")))
    with torch.no_grad():
        logits = clf(images)
    np.testing.assert_allclose(logits.softmax(1).numpy(), model.predict_proba(images), atol=1e-4)
    assert [model.classes[i] for i in logits.argmax(1)] == model.predict(images)


def test_onnx_runs_in_onnxruntime_and_matches_pytorch(run, model, images, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = export_run(run, "onnx", "projection", tmp_path / "proj.onnx")
    assert not list(tmp_path.glob("*.data"))  # the weights are inside the file
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape[1:] == [16, 16, 3]
    assert session.get_outputs()[0].name == "embeddings"
    for x in (images, images[:2]):  # the batch dimension is dynamic
        (z,) = session.run(None, {"images": x.numpy()})
        np.testing.assert_allclose(z, model.embed(x, space="projection"), atol=1e-4)
    side = json.loads((tmp_path / "proj.onnx.json").read_text())
    assert side["input"]["shape"] == ["batch", 16, 16, 3] and side["input"]["dtype"] == "uint8"
    assert side["output"]["shape"] == ["batch", 32] and "L2-normalised" in side["output"]["meaning"]
    info = json.loads((run / "model.json").read_text())
    assert side["classes"] == info["classes"] and side["normalization"] == info["normalization"]
    assert side["image_size"] == 16 and side["preprocess"] == info["preprocess"]


def test_safetensors_export_loads_into_the_encoder(run, model, images, tmp_path):
    out = export_run(run, "safetensors", "encoder", tmp_path / "enc.safetensors")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    info = json.loads(meta["model_info"])
    assert meta["space"] == "encoder" and info["classes"] == model.classes
    encoder = build_encoder_for(from_dict({"model": info["model"]}), _shape_only(info))
    encoder.load_state_dict(load_file(str(out)))  # strict: every key, every shape
    x = images.permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(info["normalization"][k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        z = encoder.eval()((x - mean) / std)
    np.testing.assert_allclose(z.numpy(), model.embed(images, normalize=False), atol=1e-4)
    side = json.loads((tmp_path / "enc.safetensors.json").read_text())
    assert side["input"]["layout"] == "NCHW" and side["input"]["dtype"] == "float32"


def test_refusals(run, tmp_path, monkeypatch):
    out = tmp_path / "m.pt"
    out.write_bytes(b"old")
    with pytest.raises(UsageError, match="exists; use --overwrite"):
        export_run(run, "torchscript", out=out)
    assert out.read_bytes() == b"old"
    export_run(run, "torchscript", out=out, overwrite=True)
    assert torch.jit.load(str(out))(digits_test_images(2)[0]).shape == (2, 128)
    with pytest.raises(UsageError, match="unknown export format"):
        export_run(run, "tflite", out=tmp_path / "m.tflite")
    real = export_mod.importlib.util.find_spec
    monkeypatch.setattr(export_mod.importlib.util, "find_spec", lambda n: None if n == "onnx" else real(n))
    with pytest.raises(UsageError, match=r"pip install 'supcon\[onnx\]'"):
        export_run(run, "onnx", out=tmp_path / "m.onnx")


@pytest.mark.slow
def test_cli_export(run, model, images, tmp_path):
    def cli(*args):
        cmd = [sys.executable, "-m", "supcon", "export", "--from", str(run), *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True)

    r = cli("--format", "torchscript", "--space", "classifier", "--out", tmp_path / "c.pt")
    assert r.returncode == 0, r.stderr
    assert "input uint8 ['batch', 16, 16, 3] (NHWC), output logits ['batch', 10]" in r.stdout
    with torch.no_grad():
        logits = torch.jit.load(str(tmp_path / "c.pt"))(images)
    np.testing.assert_allclose(logits.softmax(1).numpy(), model.predict_proba(images), atol=1e-4)
    again = cli("--format", "torchscript", "--space", "classifier", "--out", tmp_path / "c.pt")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr
