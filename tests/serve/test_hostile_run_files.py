"""A run folder's files are checked when read back: a damaged or hand-edited model.json or config.yaml
is one UsageError line naming the file and the key from supcon.load, embed and export; outputs
replace only regular files; odd images are refused."""

import json
import os
import shutil

import numpy as np
import pytest

import supcon
from supcon.core.errors import UsageError
from supcon.serve.embed import embed_run
from supcon.serve.export import export_run


def _edit(info, key, value):
    node = info
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[part]
    if value is _DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return info


_DELETE = object()
VARIANTS = [
    ("classes", _DELETE, "classes is missing"),
    ("image_size", _DELETE, "image_size is missing"),
    ("image_size", "abc", "image_size must be an integer"),
    ("image_size", [16], "image_size must be an integer"),
    ("image_size", 0, "image_size must be at least 1"),
    ("image_size", -16, "image_size must be at least 1"),
    ("image_size", 10**30, "image_size must be at most"),
    ("channels", 2, "channels must be one of"),
    ("normalization", "x", "normalization must be a mapping"),
    ("normalization.std", [0, 0, 0], r"normalization.std\[0\] must be above 0"),
    ("normalization.std", [1, 1], "normalization.std must hold 3"),
    ("normalization.mean", ["a", 0, 0], r"normalization.mean\[0\] must be a finite number"),
    ("multilabel", "false", "multilabel must be true or false"),
    ("classes", [1, 2, 3], r"classes\[0\] must be a string"),
    ("classes", [], "classes must list"),
    ("preprocess.size", 99, "preprocess.size must be one of"),
    ("preprocess.resize", "stretch", "preprocess.resize must be one of"),
    ("model.feature_dim", "abc", "model.feature_dim"),
    ("model.feature_dim", 0, "model.feature_dim must be at least 1"),
    ("model.feature_dim", 65536, "GiB"),
    ("model", [1], "model must be a mapping"),
    ("model.blocks", [1, 1, 1, 1, 1, 1], "model.blocks must be 1 to 4"),
    ("model.encoder", "no-such-net", "no-such-net"),
    ("format", 7, "format must be one of 1"),
]


@pytest.fixture(scope="module")
def copy_of(run, tmp_path_factory):
    def make(edit=None, text=None):
        dst = tmp_path_factory.mktemp("hostile") / "run"
        shutil.copytree(run, dst, ignore=shutil.ignore_patterns("checkpoints"))
        path = dst / "model.json"
        if edit is not None:
            path.write_text(json.dumps(_edit(json.loads(path.read_text()), *edit)))
        if text is not None:
            path.write_bytes(text)
        return dst

    return make


@pytest.mark.parametrize("key, value, match", VARIANTS, ids=[f"{k}={str(v)[:12]}" for k, v, _ in VARIANTS])
def test_a_damaged_model_json_is_one_line_naming_file_and_key(copy_of, key, value, match):
    run = copy_of((key, value))
    with pytest.raises(UsageError, match=match) as e:
        supcon.load(run, device="cpu")
    msg = str(e.value)
    assert "model.json" in msg and "\n" not in msg and len(msg) < 400


@pytest.mark.parametrize(
    "text", [b"[" * 100_000, b'{"a":' * 40 + b"1" + b"}" * 40, b"\x00\x01", b"not json", b"[]", b"null"]
)
def test_unparseable_model_json(copy_of, text):
    run = copy_of(text=text)
    with pytest.raises(UsageError, match="model.json"):
        supcon.load(run, device="cpu")


def test_embed_and_export_report_the_same(copy_of, tmp_path):
    run = copy_of(("image_size", "abc"))
    with pytest.raises(UsageError, match="image_size must be an integer"):
        embed_run(run, tmp_path / "e.npz", progress=False, device="cpu")
    with pytest.raises(UsageError, match="image_size must be an integer"):
        export_run(run, "safetensors", "encoder", tmp_path / "w.safetensors")


@pytest.mark.parametrize(
    "text",
    ["model: {feature_dim: -3}\n", "seed: 1e400\n", "a: &a [*a]\n", "[1]\n", "data:\n  path: [1, 2]\n"],
)
def test_a_damaged_config_yaml_is_one_line(copy_of, text, tmp_path):
    run = copy_of()
    (run / "config.yaml").write_text(text)
    with pytest.raises(UsageError, match="config.yaml") as e:
        embed_run(run, tmp_path / "e.npz", progress=False, device="cpu")  # reads the run's dataset config
    assert "\n" not in str(e.value)


def test_outputs_replace_only_regular_files(run, tmp_path):
    fifo = tmp_path / "out.npz"
    os.mkfifo(fifo)
    folder = tmp_path / "enc.pt"
    folder.mkdir()
    for kwargs in ({"overwrite": True}, {"overwrite": False}):
        with pytest.raises(UsageError, match="not a regular file"):
            embed_run(run, fifo, progress=False, device="cpu", **kwargs)
        with pytest.raises(UsageError, match="not a regular file"):
            export_run(run, "torchscript", "encoder", folder, **kwargs)
    with pytest.raises(UsageError, match="not a regular file"):
        export_run(run, "safetensors", "encoder", "/dev/null", overwrite=True)
    assert fifo.exists() and folder.is_dir() and not any(folder.iterdir())


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 5, 3), (5, 0), (0, 0)])
def test_empty_images_are_refused(model, shape):
    with pytest.raises(UsageError, match="at least 1x1"):
        model.embed(np.zeros(shape, np.uint8))
    with pytest.raises(UsageError, match="at least 1x1"):
        model.embed([np.zeros(shape, np.uint8)])


def test_a_zero_size_pil_image_is_refused(model):
    from PIL import Image

    with pytest.raises(UsageError, match="at least 1x1"):
        model.embed(Image.new("RGB", (0, 0)))


def test_multilabel_data_through_a_single_label_run_is_one_line(run, model, tmp_path, monkeypatch):
    import torch

    from supcon.data.dataset import ImageDataset
    from supcon.serve import embed as embed_mod

    s, c = model.image_size, model.channels
    x = torch.zeros(4, s, s, c, dtype=torch.uint8)
    y = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    multi = ImageDataset("tags", x, y, x, y, ["a", "b", "c"])
    monkeypatch.setattr(embed_mod, "load_dataset", lambda *a, **k: multi)
    with pytest.raises(UsageError, match="multi-label .* single-label") as e:
        embed_run(run, tmp_path / "e.npz", data="tags.csv", progress=False, device="cpu")
    assert "\n" not in str(e.value) and not (tmp_path / "e.npz").exists()
    monkeypatch.setattr(model, "multilabel", True)  # a multi-label run takes it: names joined by |
    rows = list(embed_mod.batches(model, multi, "test", "encoder", True, 2, _NoBar()))
    assert [n for b in rows for n in b.class_names] == ["a|c", "b", "a|b", "c"]
    assert all((b.labels == -1).all() for b in rows)


class _NoBar:
    def update(self, n):
        pass
