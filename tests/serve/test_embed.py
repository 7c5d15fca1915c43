import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from _trained import run_data  # tests/ is on sys.path under pytest
from supcon.core.errors import UsageError
from supcon.data.dataset import ImageDataset
from supcon.serve import embed as embed_mod
from supcon.serve.embed import embed_run


@pytest.fixture(scope="module")
def digits():
    return run_data()


def test_npz_holds_the_embeddings_labels_and_classes_of_the_run_dataset(run, model, digits, tmp_path):
    r = embed_run(run, tmp_path / "e.npz", device="cpu", progress=False)
    n = len(digits.test_y)
    assert (r["count"], r["dim"]) == (n, 128)
    f = np.load(tmp_path / "e.npz")  # plain arrays: no pickle needed
    assert f["embeddings"].dtype == np.float32
    np.testing.assert_allclose(f["embeddings"], model.embed(digits.test_x), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(f["embeddings"], axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(f["labels"], digits.test_y.numpy())
    assert list(f["class_names"][:5]) == [str(int(y)) for y in digits.test_y[:5]]
    assert list(f["classes"]) == digits.classes
    np.testing.assert_array_equal(f["indices"], np.arange(n))
    assert set(f["splits"]) == {"test"} and "paths" not in f.files


def test_all_splits_raw_projection_space(run, model, digits, tmp_path):
    embed_run(run, tmp_path / "p.npz", split="all", space="projection", normalize=False, progress=False)
    f = np.load(tmp_path / "p.npz")
    n_train = len(digits.train_y)
    assert f["embeddings"].shape == (n_train + len(digits.test_y), 32)
    assert list(f["splits"][[0, n_train - 1, n_train]]) == ["train", "train", "test"]
    want = model.embed(digits.train_x[:40], space="projection", normalize=False)
    np.testing.assert_allclose(f["embeddings"][:40], want, atol=1e-5)
    np.testing.assert_array_equal(f["labels"][n_train:], digits.test_y.numpy())


def test_parquet_streams_row_groups_with_the_same_values(run, model, digits, tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr(embed_mod, "_ROW_GROUP", 100)
    r = embed_run(run, tmp_path / "e.parquet", batch_size=64, progress=False)
    meta = pq.ParquetFile(tmp_path / "e.parquet").metadata
    assert meta.num_rows == r["count"] == len(digits.test_y) == 450
    assert meta.num_row_groups == 4  # 3 x 128 (two batches of 64 each) + 66
    t = pq.read_table(tmp_path / "e.parquet")
    z = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(z, model.embed(digits.test_x), atol=1e-6)
    assert t.column("label").to_pylist() == digits.test_y.tolist()
    assert t.column("class_name").to_pylist()[:3] == [str(int(y)) for y in digits.test_y[:3]]
    assert t.column("index").to_pylist() == list(range(450))


class SlicesOnly:
    """An image set with only ``len`` and slices (as the stored large-image sets)."""

    def __init__(self, x: torch.Tensor):
        self._x = x

    def __len__(self) -> int:
        return len(self._x)

    def __getitem__(self, key):
        if not isinstance(key, slice):
            raise TypeError("slices only")
        return self._x[key]


def test_batches_need_only_len_and_slices(model, digits):
    data = ImageDataset(
        "sliced", digits.train_x, digits.train_y, SlicesOnly(digits.test_x[:70]), digits.test_y[:70],
        digits.classes, test_paths=[f"img/{i}.png" for i in range(70)],
    )  # fmt: skip

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    got = list(embed_mod.batches(model, data, "test", "encoder", True, 32, bar))
    assert [len(b.labels) for b in got] == [32, 32, 6] and bar.n == 70
    np.testing.assert_allclose(np.concatenate([b.z for b in got]), model.embed(digits.test_x[:70]), atol=1e-6)
    assert got[2].paths == [f"img/{i}.png" for i in range(64, 70)]


def test_projector_files(run, model, digits, tmp_path):
    tb = pytest.importorskip("tensorboard.plugins.projector.projector_config_pb2")
    from google.protobuf import text_format

    r = embed_run(run, tmp_path / "e.npz", projector=tmp_path / "tb", projector_count=30, progress=False)
    assert r["projector"] == 30
    cfg = text_format.Parse((tmp_path / "tb" / "projector_config.pbtxt").read_text(), tb.ProjectorConfig())
    (emb,) = cfg.embeddings
    assert (emb.tensor_path, emb.metadata_path, emb.sprite.image_path) == (
        "tensors.tsv",
        "metadata.tsv",
        "sprite.png",
    )
    assert list(emb.tensor_shape) == [30, 128] and list(emb.sprite.single_image_dim) == [16, 16]
    z = np.loadtxt(tmp_path / "tb" / "tensors.tsv", delimiter="\t")
    np.testing.assert_allclose(z, model.embed(digits.test_x[:30]), atol=1e-5)
    meta = (tmp_path / "tb" / "metadata.tsv").read_text().splitlines()
    assert meta[0] == "label\tclass\tsplit\tindex" and len(meta) == 31
    assert meta[1].split("\t") == [str(int(digits.test_y[0]))] * 2 + ["test", "0"]
    sprite = np.asarray(Image.open(tmp_path / "tb" / "sprite.png"))
    assert sprite.shape == (6 * 16, 6 * 16, 3)  # a 6 x 6 grid of 16-pixel thumbnails
    np.testing.assert_array_equal(sprite[16:32, 0:16], digits.test_x[6].numpy())


def test_other_data_is_resized_to_the_model_and_refused_when_it_cannot_fit(run, model, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(2):
                a = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(a).save(tmp_path / "imgs" / split / c / f"{i}.png")
    r = embed_run(run, tmp_path / "f.npz", data=str(tmp_path / "imgs"), progress=False)
    f = np.load(tmp_path / "f.npz")
    assert r["count"] == 4 and list(f["classes"]) == ["a", "b"]
    files = sorted((tmp_path / "imgs" / "test").glob("*/*.png"))
    np.testing.assert_allclose(f["embeddings"], model.embed(files), atol=1e-5)

    x, y = torch.zeros(2, 32, 32, 3, dtype=torch.uint8), torch.zeros(2, dtype=torch.long)
    big = ImageDataset("big", x, y, x, y, classes=["a", "b"])
    monkeypatch.setattr(embed_mod, "load_dataset", lambda *a, **k: big)
    with pytest.raises(UsageError, match="holds 32x32x3 images but the model takes 16x16x3"):
        embed_run(run, tmp_path / "g.npz", data=str(tmp_path / "imgs"), progress=False)


def test_bad_outputs_are_refused_before_any_work(run, tmp_path, monkeypatch):
    out = tmp_path / "e.npz"
    out.write_bytes(b"old")
    with pytest.raises(UsageError, match="exists; use --overwrite"):
        embed_run(run, out, progress=False)
    assert out.read_bytes() == b"old"
    embed_run(run, out, overwrite=True, progress=False)
    assert len(np.load(out)["labels"]) == 450
    with pytest.raises(UsageError, match=r"name the file \.npz .* or \.parquet"):
        embed_run(run, tmp_path / "e.csv", progress=False)
    real = embed_mod.importlib.util.find_spec
    monkeypatch.setattr(embed_mod.importlib.util, "find_spec", lambda n: None if n == "pyarrow" else real(n))
    with pytest.raises(UsageError, match=r"pip install 'supcon\[parquet\]'"):
        embed_run(run, tmp_path / "e.parquet", progress=False)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "supcon", *map(str, args)], capture_output=True, text=True)


@pytest.mark.slow
def test_cli_embed(run, tmp_path):
    r = _cli("embed", "--from", run, "--out", tmp_path / "e.npz", "--quiet", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "wrote 450 embeddings (128-d encoder space, L2-normalised)" in r.stdout
    again = _cli("embed", "--from", run, "--out", tmp_path / "e.npz", "--quiet")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "config.yaml", bare)
    r = _cli("embed", "--from", bare, "--out", tmp_path / "x.npz", "--quiet")
    assert r.returncode == 2 and "no trained encoder" in r.stderr and r.stderr.count("\n") == 1
