"""Image files at any scale: manifests (three layouts), the on-disk store, stored images' views and
crops, and training from the store."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from supcon.core.errors import UsageError
from supcon.data import store as store_mod
from supcon.data.datasets import load_dataset, split_validation
from supcon.data.imageset import StoredImages, crop_box, storage_side, take
from supcon.data.manifest import read_manifest
from supcon.data.store import open_store, store_dir, stored_shape

CLASSES = ("ant", "bee", "cow")


def _image(rng, h, w, c):
    a = (rng.random((h, w, 3)) * 120).astype(np.uint8)
    a[..., c] += 120  # each class leans to one colour channel
    return a


def _photos(root, per_class=6, layout="flat", fmt="png", seed=0):
    """Images of random sizes and aspect ratios: flat (<class>/*) or split (train|test/<class>/*)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(20, 70, 2))
            sub = ("train" if i < per_class - 2 else "test") if layout == "split" else ""
            path = root / sub / name / f"{i}.{fmt}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_image(rng, h, w, c)).save(path)
    return root


# --------------------------------------------------------------------------- manifests


def test_a_flat_folder_is_split_per_class_the_same_way_every_time(tmp_path):
    root = _photos(tmp_path / "p", per_class=10)
    a, b = read_manifest(root, 0.2), read_manifest(root, 0.2)
    assert a.classes == list(CLASSES)
    assert [f[1] for f in a.test] == [f[1] for f in b.test]
    assert np.bincount(a.test_y).tolist() == [2, 2, 2]  # 20% of 10 per class
    assert not {f[1] for f in a.train} & {f[1] for f in a.test}
    assert all(f[1].split("/")[0] == CLASSES[y] for f, y in zip(a.train, a.train_y, strict=True))


def test_a_split_folder_keeps_its_splits(tmp_path):
    m = read_manifest(_photos(tmp_path / "p", layout="split"))
    assert len(m.train) == 12 and len(m.test) == 6
    assert all(f[1].startswith("test/") for f in m.test)


def test_csv_manifest_paths_are_relative_to_it_and_the_split_column_is_kept(tmp_path):
    _photos(tmp_path / "p", per_class=4)
    rows = ["path,label,split"] + [
        f"p/{c}/{i}.png,{c},{'test' if i == 0 else ''}" for c in CLASSES for i in range(4)
    ]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    m = read_manifest(tmp_path / "m.csv", test_fraction=0.01)
    assert sorted(f[1] for f in m.test) == [f"p/{c}/0.png" for c in CLASSES]
    assert len(m.train) == 9


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,label\na.png,x\n", "missing column(s) path"),
        ("path,label\n", "no rows"),
        ("path,label\np/ant/0.png,\n", "line 2: empty label"),
        ("path,label\np/ant/0.txt,ant\n", "not an image file"),
        ("path,label,split\np/ant/0.png,ant,val\n", "split must be train or test"),
        ("path,label\n" + "".join(f"gone{i}.png,ant\np/bee/0.png,bee\n" for i in range(7)), "7 listed"),
    ],
)
def test_bad_manifests_are_one_line_errors(tmp_path, text, message):
    _photos(tmp_path / "p", per_class=2)
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(UsageError, match="m.csv") as e:
        read_manifest(tmp_path / "m.csv")
    assert message in str(e.value) and "\n" not in str(e.value)
    if "listed" in message:
        assert "gone0.png (line 2)" in str(e.value) and "and 2 more" in str(e.value)


def test_a_folder_with_one_class_or_no_images_is_refused(tmp_path):
    (tmp_path / "one" / "ant").mkdir(parents=True)
    with pytest.raises(UsageError, match="2 or more class folders"):
        read_manifest(tmp_path / "one")
    (tmp_path / "one" / "bee").mkdir()
    with pytest.raises(UsageError, match="has no images"):
        read_manifest(tmp_path / "one")


# --------------------------------------------------------------------------- the store


def test_stored_images_keep_their_aspect_at_the_short_side(tmp_path):
    root = _photos(tmp_path / "p")
    m = read_manifest(root)
    st = open_store(m, 32, cache_dir=tmp_path / "cache", progress=False, workers=1)
    assert len(st) == len(m.files())
    for i, (path, *_) in enumerate(m.files()):
        src = np.asarray(Image.open(path))
        h, w = st.image(i).shape[:2]
        assert min(h, w) == 32
        assert (h, w) == stored_shape(*src.shape[:2], 32)
        assert abs(h / w - src.shape[0] / src.shape[1]) < 0.05
        want = np.asarray(Image.fromarray(src).resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0))
        np.testing.assert_array_equal(st.image(i), want)


def test_a_store_is_reused_and_rebuilt_when_a_file_changes(tmp_path):
    root = _photos(tmp_path / "p")
    cache = tmp_path / "cache"
    first = open_store(read_manifest(root), 32, cache_dir=cache, progress=False, workers=1)
    stamp = (first.path / "index.npy").stat().st_mtime_ns
    again = open_store(read_manifest(root), 32, cache_dir=cache, progress=False, workers=1)
    assert again.path == first.path and (again.path / "index.npy").stat().st_mtime_ns == stamp
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(root / "ant" / "0.png")
    changed = open_store(read_manifest(root), 32, cache_dir=cache, progress=False, workers=1)
    assert changed.path != first.path
    assert not first.path.exists()  # the older store of the same folder is removed
    assert [p.name for p in (cache / "store").iterdir()] == [changed.path.name]
    other_size = open_store(read_manifest(root), 24, cache_dir=cache, progress=False, workers=1)
    assert changed.path.exists() and other_size.path.exists()  # another size is another store


def test_a_killed_build_resumes_from_its_finished_chunks_and_is_never_trusted_half_done(
    tmp_path, monkeypatch
):
    root = _photos(tmp_path / "p", per_class=8)
    m = read_manifest(root)
    clean = open_store(m, 24, cache_dir=tmp_path / "clean", progress=False, workers=1)
    monkeypatch.setattr(store_mod, "_CHUNK", 5)
    calls = []
    real = store_mod._store_job

    def dies_on_third_chunk(job):
        calls.append(job[0])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the build is killed mid-way
        return real(job)

    monkeypatch.setattr(store_mod, "_store_job", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        open_store(m, 24, cache_dir=tmp_path / "c", progress=False, workers=1)
    final = store_dir(m, 24, tmp_path / "c")
    assert not final.exists()  # nothing half-built under the name that is trusted
    assert np.load(final.with_name(final.name + ".partial") / "done.npy").sum() == 2
    calls.clear()
    monkeypatch.setattr(store_mod, "_store_job", lambda job: calls.append(job[0]) or real(job))
    resumed = open_store(m, 24, cache_dir=tmp_path / "c", progress=False, workers=1)
    assert calls == [2, 3, 4]  # only the chunks not finished before
    np.testing.assert_array_equal(np.asarray(resumed.images), np.asarray(clean.images))


def test_a_full_disk_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil as sh

    root = _photos(tmp_path / "p")
    monkeypatch.setattr(sh, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(UsageError, match=r"image store needs .* but .* has 1000 bytes free"):
        open_store(read_manifest(root), 32, cache_dir=tmp_path / "c", progress=False, workers=1)
    assert not any((tmp_path / "c" / "store").glob("*/index.npy"))


def test_an_image_too_small_to_crop_is_named(tmp_path):
    root = _photos(tmp_path / "p")
    Image.fromarray(np.zeros((5, 40, 3), np.uint8)).save(root / "bee" / "tiny.png")
    with pytest.raises(UsageError, match=r"tiny.png is 40x5: too small"):
        open_store(read_manifest(root), 32, cache_dir=tmp_path / "c", progress=False, workers=1)


def test_a_corrupt_image_is_named(tmp_path):
    root = _photos(tmp_path / "p")
    (root / "cow" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match=r"cannot decode image .*bad.png"):
        open_store(read_manifest(root), 32, cache_dir=tmp_path / "c", progress=False, workers=1)


# --------------------------------------------------------------------------- views and crops


@pytest.fixture
def stored(tmp_path):
    m = read_manifest(_photos(tmp_path / "p", per_class=6))
    st = open_store(m, storage_side(28), cache_dir=tmp_path / "c", progress=False, workers=1)
    return StoredImages(st, np.arange(len(st)), 28)


def test_the_evaluation_view_is_the_centre_of_the_stored_image(stored):
    assert stored.shape == (18, 28, 28, 3) and storage_side(224) == 256
    batch = stored[torch.tensor([3, 0])]
    assert batch.dtype == torch.uint8 and batch.shape == (2, 28, 28, 3)
    img = stored.store.image(3)
    top, left = round((img.shape[0] - 28) / 2), round((img.shape[1] - 28) / 2)
    np.testing.assert_array_equal(batch[0].numpy(), img[top : top + 28, left : left + 28])
    np.testing.assert_array_equal(stored[2:4].numpy(), stored[[2, 3]].numpy())


def test_subsets_are_views_and_the_validation_split_takes_them(stored):
    y = torch.arange(18) % 3
    x_tr, y_tr, x_val, y_val = split_validation(stored, y, 0.34, seed=0)
    assert isinstance(x_tr, StoredImages) and len(x_tr) + len(x_val) == 18
    assert set(x_tr.ids.tolist()).isdisjoint(x_val.ids.tolist())
    np.testing.assert_array_equal(take(stored, [5, 1])[1].numpy(), stored[1].numpy())


def test_random_crops_follow_torchvision_box_rules_on_the_true_aspect(stored):
    rng = np.random.default_rng(0)
    for h, w in ((40, 90), (90, 40), (64, 64)):
        for _ in range(200):
            top, left, ch, cw = crop_box(h, w, rng, (0.2, 1.0), (3 / 4, 4 / 3))
            assert 0 <= top <= h - ch and 0 <= left <= w - cw
            area = ch * cw / (h * w)
            assert 0.18 <= area <= 1.0
    # The fallback (no try fits: an impossible area share) is the largest centre crop in the ratio range.
    assert crop_box(40, 100, rng, (1.0, 1.0), (1.0, 1.0)) == (0, 30, 40, 40)


def test_random_crops_are_reproducible_and_view_major(stored):
    a = stored.random_crops([0, 5, 9], np.random.default_rng([1, 2]), views=2)
    b = stored.random_crops([0, 5, 9], np.random.default_rng([1, 2]), views=2)
    c = stored.random_crops([0, 5, 9], np.random.default_rng([1, 3]), views=2)
    assert a.shape == (6, 28, 28, 3) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Row v * B + b is a crop of image b: each class's colour channel dominates its crops.
    chan = a.float().mean((1, 2)).argmax(1)
    want = stored[[0, 5, 9]].float().mean((1, 2)).argmax(1)
    assert len(set(want.tolist())) == 2 and chan.tolist() == want.tolist() * 2


# --------------------------------------------------------------------------- training from the store


def test_image_folders_go_to_the_store_from_64_px_and_stay_in_memory_below(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPCON_DATA", str(tmp_path / "cache"))
    root = _photos(tmp_path / "p", per_class=5, fmt="jpg")
    big = load_dataset("imagefolder", str(root), image_size=64, progress=False)
    small = load_dataset("imagefolder", str(root), image_size=16, progress=False)
    assert isinstance(big.train_x, StoredImages) and big.image_size == 64
    assert isinstance(small.train_x, torch.Tensor) and small.train_x.shape[1:] == (16, 16, 3)
    assert big.train_paths == small.train_paths and len(big.test_paths) == len(big.test_y)
    assert big.classes == small.classes == list(CLASSES)
    with pytest.raises(UsageError, match="data.store=disk needs --image-size"):
        load_dataset("imagefolder", str(root), store="disk", progress=False)


def test_pretraining_reads_prefetched_crops_from_the_store_reproducibly(tmp_path, monkeypatch):
    import supcon

    monkeypatch.setenv("SUPCON_DATA", str(tmp_path / "cache"))
    root = _photos(tmp_path / "p", per_class=6, fmt="jpg")
    overrides = {
        "data.dataset": "imagefolder", "data.path": str(root), "data.image_size": 16,
        "data.store": "disk", "model.encoder": "resnet18", "model.width": 4, "model.projection": "linear",
        "pretrain.epochs": 2, "pretrain.batch_size": 4, "pretrain.augment": "supcon", "pretrain.views": 2,
    }  # fmt: skip
    full = supcon.run("pretrain", out=tmp_path / "a", overrides=overrides, progress=False)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("data_wait_seconds" in r for r in records)
    from PIL import Image as PILImage

    with PILImage.open(tmp_path / "a" / "views.png") as grid:  # originals and 4 views of 8 images
        assert grid.width > 4 * grid.height / 8
    again = supcon.run("pretrain", out=tmp_path / "b", overrides=overrides | {}, progress=False)
    assert again["rows"][0]["test_acc"] == full["rows"][0]["test_acc"]
    a = [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line)["loss"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert a == b  # the same crops whatever the threads' timing


def test_a_run_on_the_store_stopped_mid_epoch_resumes_bit_identically(tmp_path, monkeypatch):
    from supcon.commands import COMMANDS
    from supcon.core.config import load_preset, set_values
    from supcon.data.imageset import StoredImages as SI
    from supcon.runs.open import open_run

    monkeypatch.setenv("SUPCON_DATA", str(tmp_path / "cache"))
    root = _photos(tmp_path / "p", per_class=6, fmt="jpg")

    def config():
        cfg = load_preset("keras-example")
        set_values(cfg, {
            "data.dataset": "imagefolder", "data.path": str(root), "data.image_size": 16,
            "data.store": "disk", "model.encoder": "resnet18", "model.width": 4, "ce.epochs": 2,
            "ce.batch_size": 4, "ce.augment": "crop-flip", "tune_cpu": False,
        })  # fmt: skip
        return cfg

    def train(out, resume=False):
        run = open_run(config(), out, resume=resume, progress=False)
        try:
            with run.stop:
                return COMMANDS["train-ce"].function()(run, None)
        finally:
            run.close()

    straight = train(tmp_path / "a")
    real, calls = SI.random_crops, []

    def stop_on_fifth_batch(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            stop.requested = True  # as SIGTERM would, while batches are read ahead
        return real(self, *a, **k)

    from supcon.core.stop import Interrupted, StopFlag

    stop = StopFlag()
    monkeypatch.setattr(SI, "random_crops", stop_on_fifth_batch)
    run = open_run(config(), tmp_path / "b", progress=False)
    run.stop = stop
    with pytest.raises(Interrupted) as e:
        COMMANDS["train-ce"].function()(run, None)
    run.close()
    assert re.search(r"ce-e\d{4}\.\d{6}\.pt$", str(e.value.args[0]))  # a checkpoint inside an epoch
    monkeypatch.setattr(SI, "random_crops", real)
    resumed = train(tmp_path / "b", resume=True)
    assert resumed["rows"][0]["test_acc"] == straight["rows"][0]["test_acc"]
    wa = load_file(str(tmp_path / "a" / "weights" / "ce.safetensors"))
    wb = load_file(str(tmp_path / "b" / "weights" / "ce.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_parallel_build_equals_a_serial_one(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "_CHUNK", 4)
    m = read_manifest(_photos(tmp_path / "p", per_class=6))
    serial = open_store(m, 24, cache_dir=tmp_path / "a", progress=False, workers=1)
    parallel = open_store(m, 24, cache_dir=tmp_path / "b", progress=False, workers=2)
    np.testing.assert_array_equal(np.asarray(parallel.images), np.asarray(serial.images))
    np.testing.assert_array_equal(parallel.offsets, serial.offsets)
