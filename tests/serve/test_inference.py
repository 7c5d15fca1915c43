import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

import supcon
from _files import KINDS, make_special  # tests/ is on sys.path under pytest
from _trained import OVERRIDES, digits_test_images
from supcon.core.config import Config, set_values
from supcon.core.errors import UsageError
from supcon.core.runtime import resolve_runtime
from supcon.data.datasets import channel_stats, load_dataset, load_split
from supcon.models.build import load_phase_model
from supcon.serve.inference import prepare


def _cfg() -> Config:
    cfg = Config()
    set_values(cfg, OVERRIDES)
    return cfg


def _reference(run, phase: str, images: torch.Tensor, part: str | None = None) -> torch.Tensor:
    """The phase's saved model run by hand on the training dataset's own inputs."""
    cfg = _cfg()
    data, _ = load_split(cfg.data, cfg.seed, progress=False)
    m = load_phase_model(cfg, data, phase, run / "weights" / f"{phase}.safetensors").eval()
    net = getattr(m, part) if part else m
    rt = resolve_runtime("cpu", "fp32", False)
    with torch.no_grad():
        return net(rt.images(images, data.norm))


def test_model_json_holds_what_the_weights_need(run):
    info = json.loads((run / "model.json").read_text())
    cfg = _cfg()
    data, split = load_split(cfg.data, cfg.seed, progress=False)
    assert info["classes"] == data.classes == [str(i) for i in range(10)]
    assert (info["image_size"], info["channels"]) == (16, 3)
    norm = channel_stats(split.train_x)
    assert info["normalization"] == {"mean": list(norm.mean), "std": list(norm.std)}
    assert info["encoder"]["name"] == "keras-cnn" and info["model"]["projection"] == "mlp"
    assert info["preprocess"] == {"resize": "square", "size": 16, "interpolation": "bilinear"}


def test_embed_matches_the_saved_encoder_run_by_hand(run, model):
    x, _ = digits_test_images(20)
    assert model.encoder_phase == "pretrain" and model.classifier_phase == "linear"
    raw = _reference(run, "pretrain", x, "encoder")
    np.testing.assert_allclose(model.embed(x, normalize=False), raw.numpy(), atol=1e-5)
    z = model.embed(x)
    assert z.dtype == np.float32 and z.shape == (20, 128)
    np.testing.assert_allclose(z, F.normalize(raw, dim=1).numpy(), atol=1e-6)
    proj = model.embed(x, space="projection", normalize=False)
    np.testing.assert_allclose(proj, _reference(run, "pretrain", x).numpy(), atol=1e-5)
    assert proj.shape == (20, 32)


def test_predict_is_the_linear_classifier(run, model):
    x, _ = digits_test_images(30)
    logits = _reference(run, "linear", x)
    assert model.predict(x) == [str(int(i)) for i in logits.argmax(1)]
    p = model.predict_proba(x)
    np.testing.assert_allclose(p, logits.softmax(1).numpy(), atol=1e-6)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    ce = supcon.load(run, device="cpu", classifier="ce")
    assert ce.predict(x) == [str(int(i)) for i in _reference(run, "ce", x).argmax(1)]


def test_every_kind_of_image_input_gives_the_same_embedding(model, tmp_path):
    x, _ = digits_test_images(4)
    want = model.embed(x)
    pils = [Image.fromarray(a.numpy()) for a in x]
    paths = []
    for i, im in enumerate(pils):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    np.testing.assert_allclose(model.embed(x.numpy()), want, atol=1e-6)
    np.testing.assert_allclose(model.embed(pils), want, atol=1e-6)
    np.testing.assert_allclose(model.embed(paths), want, atol=1e-6)
    np.testing.assert_allclose(model.embed([str(p) for p in paths]), want, atol=1e-6)
    np.testing.assert_allclose(model.embed(x[0].numpy()), want[:1], atol=1e-6)
    np.testing.assert_allclose(model.embed(pils[1]), want[1:2], atol=1e-6)
    np.testing.assert_allclose(model.embed(paths[2], batch_size=1), want[2:3], atol=1e-6)
    # Greyscale files become RGB (the model takes 3 channels): the channel repeated.
    pils[3].convert("L").save(tmp_path / "grey.png")
    np.testing.assert_allclose(model.embed(tmp_path / "grey.png"), want[3:4], atol=1e-6)
    assert model.embed([]).shape == (0, 128)


def test_other_sizes_are_resized_as_the_dataset_was(model, tmp_path):
    x, _ = digits_test_images(2)
    small = [Image.fromarray(a.numpy()).resize((8, 8), Image.Resampling.NEAREST) for a in x]
    by_hand = np.stack([np.asarray(im.resize((16, 16), Image.Resampling.BILINEAR)) for im in small])
    np.testing.assert_allclose(model.embed(small), model.embed(by_hand), atol=1e-6)
    np.testing.assert_allclose(
        model.embed(np.stack([np.asarray(s) for s in small])), model.embed(by_hand), atol=1e-6
    )


def test_short_side_preprocessing_resizes_then_crops_the_centre():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 80, 3), dtype=np.uint8)  # H=40, W=80
    pre = {"resize": "short-side", "resize_to": 18, "crop": "center", "size": 16}
    got = prepare(a, 3, pre)
    big = np.asarray(Image.fromarray(a).resize((36, 18), Image.Resampling.BILINEAR, reducing_gap=2.0))
    np.testing.assert_array_equal(got, big[1:17, 10:26])
    grey = prepare(a, 1, pre)
    assert grey.shape == (16, 16, 1)


def test_a_run_without_model_json_is_rebuilt_from_its_config_and_data(run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "model.json").unlink()
    x, _ = digits_test_images(5)
    m = supcon.load(old, device="cpu")
    assert m.info == json.loads((run / "model.json").read_text())
    np.testing.assert_array_equal(m.embed(x), supcon.load(run, device="cpu").embed(x))
    # Without the data to rebuild it from, the error says what is missing.
    cfg = (old / "config.yaml").read_text().replace("dataset: digits", "dataset: imagefolder")
    (old / "config.yaml").write_text(cfg)
    with pytest.raises(UsageError, match="no model.json .* cannot be loaded"):
        supcon.load(old)


def test_bad_run_folders_and_inputs_are_one_line_errors(run, tmp_path, model):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "config.yaml", bare)
    with pytest.raises(UsageError, match="no trained encoder"):
        supcon.load(bare)
    ce_only = tmp_path / "ce"
    shutil.copytree(run, ce_only)
    for phase in ("pretrain", "linear"):
        (ce_only / "weights" / f"{phase}.safetensors").unlink()
    m = supcon.load(ce_only, device="cpu")
    assert (m.encoder_phase, m.classifier_phase) == ("ce", "ce")
    with pytest.raises(UsageError, match="projection space needs pre-training weights"):
        m.embed(digits_test_images(1)[0], space="projection")
    with pytest.raises(UsageError, match="must be uint8"):
        model.embed(np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(UsageError, match=r"cannot read image .*missing\.png: No such file"):
        model.embed(tmp_path / "missing.png")
    with pytest.raises(UsageError, match="no linear weights"):
        supcon.load(ce_only, classifier="linear")


def _call_with_timeout(fn, fifo_path, seconds: float = 20.0):
    """``fn()``'s exception (or None) from a thread; a call still blocked after ``seconds`` fails
    the test, and a writer opened on ``fifo_path`` then lets the blocked read end."""
    got = {}

    def target():
        try:
            fn()
        except BaseException as e:
            got["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        os.close(os.open(fifo_path, os.O_WRONLY | os.O_NONBLOCK))  # unblock the reader
        t.join(seconds)
        pytest.fail(f"reading {fifo_path} blocked for {seconds} s")
    return got.get("error")


@pytest.mark.parametrize("kind", KINDS)
def test_special_files_given_as_images_are_one_line_errors_not_a_hang(model, tmp_path, kind):
    x, _ = digits_test_images(1)
    good = tmp_path / "good.png"
    Image.fromarray(x[0].numpy()).save(good)
    bad = make_special(tmp_path / "special.png", kind)
    fifo = tmp_path / "special.png" if kind == "fifo" else make_special(tmp_path / "f.fifo", "fifo")
    what = "a FIFO" if kind == "fifo" else ("a folder" if kind == "folder" else "")
    for call in (
        lambda: model.embed(bad),
        lambda: model.embed([good, str(bad)]),  # after a good image, as a string
        lambda: model.predict([bad]),
        lambda: model.predict_proba(bad, batch_size=1),
    ):
        error = _call_with_timeout(call, fifo)
        assert isinstance(error, UsageError), repr(error)
        text = str(error)
        assert str(bad) in text and what in text and "\n" not in text
        # A socket cannot even be opened (ENXIO): refused by the open, the others by their type.
        assert ("not a regular file" in text) != (kind == "socket"), text


def test_load_needs_no_dataset_when_model_json_exists(run, monkeypatch):
    # model.json + weights are enough: the dataset is never read.
    monkeypatch.setattr("supcon.data.datasets.load_dataset", _fail)
    monkeypatch.setattr("supcon.data.datasets.load_split", _fail)
    assert supcon.load(run, device="cpu").classes == load_dataset("digits").classes


def _fail(*args, **kwargs):
    raise AssertionError("the dataset was loaded")


def test_files_are_prepared_exactly_as_the_store_shows_its_images(tmp_path, monkeypatch):
    from supcon.runs.modelinfo import preprocess_for

    monkeypatch.setenv("SUPCON_DATA", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            a = rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)  # not square: resized, then cropped
            Image.fromarray(a).save(tmp_path / "imgs" / split / c / "0.png")
    data = load_dataset(None, str(tmp_path / "imgs"), image_size=64, store="disk", progress=False)
    pre = preprocess_for(data)
    assert (pre["resize"], pre["resize_to"], pre["crop"], pre["size"]) == ("short-side", 73, "center", 64)
    for i, path in enumerate(data.test_paths):
        np.testing.assert_array_equal(prepare(path, 3, pre), data.test_x[i : i + 1][0].numpy())
