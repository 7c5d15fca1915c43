"""Multi-label data: the labels column of CSV manifests, metrics against scikit-learn, the one-vs-rest
phases, the refusals of what needs one class per image, and a tiny end-to-end run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score
from torch.nn import functional as F

import supcon
from supcon.core.errors import UsageError
from supcon.data.dataset import ImageDataset
from supcon.data.datasets import load_folder, split_validation
from supcon.data.longtail import long_tailed
from supcon.data.manifest import read_manifest
from supcon.data.sampler import order_fn
from supcon.evaluation import multilabel
from supcon.evaluation.report import ap_lines, metric_text, table
from supcon.train.steps import classifier_loss, correct_predictions

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _write_csv(tmp_path, rows, header="path,labels", size=8):
    """PNG files (each a stripe per colour label, so labels can be learnt) and a CSV manifest."""
    lines = [header]
    for i, row in enumerate(rows):
        names = [n for n in row[0].split(";") if n.strip()]
        img = np.zeros((size, size, 3), np.uint8)
        for j, name in enumerate(names):
            img[:, j * size // 3 : (j + 1) * size // 3] = COLOURS.get(name.strip(), (128, 128, 128))
        Image.fromarray(img).save(tmp_path / f"img{i}.png")
        lines.append(",".join([f"img{i}.png", f'"{row[0]}"', *row[1:]]))
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _sets(n, seed=0):
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 3))
        out.append(";".join(rng.choice(names, size=k, replace=False)))
    return out


# --------------------------------------------------------------------------- manifests


def test_labels_column_gives_multi_hot_labels_over_the_sorted_union(tmp_path):
    rows = [("red;green", "train"), ("blue", "train"), (" green ; red ", "test"), ("blue;red;", "test")]
    m = read_manifest(_write_csv(tmp_path, rows, "path,labels,split"))
    assert m.multilabel and m.classes == ["blue", "green", "red"]
    assert m.train_y.dtype == np.float32
    np.testing.assert_array_equal(m.train_y, [[0, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(m.test_y, [[0, 1, 1], [1, 0, 1]])
    assert [f[1] for f in m.test] == ["img2.png", "img3.png"]


def test_single_label_csv_stays_class_ids(tmp_path):
    path = _write_csv(tmp_path, [("red",), ("blue",), ("red",), ("blue",)], "path,label")
    m = read_manifest(path)
    assert not m.multilabel and m.train_y.dtype == np.int64 and m.train_y.ndim == 1


def test_random_split_is_seeded_and_every_tested_class_is_trained(tmp_path):
    # "blue" is on one row only: wherever the random split sends it, it must train.
    sets = ["red", "green", "red;green"] * 10 + ["blue"]
    m = read_manifest(_write_csv(tmp_path, [(s,) for s in sets]), test_fraction=0.3)
    again = read_manifest(tmp_path / "data.csv", test_fraction=0.3)
    assert [f[1] for f in m.test] == [f[1] for f in again.test]
    assert len(m.test) in (9, 8)  # round(31 * 0.3), less the blue row if it was drawn
    assert len(m.train) + len(m.test) == 31
    assert (m.train_y.sum(0) > 0).all()
    assert not (m.test_y[:, m.classes.index("blue")] > 0).any()


@pytest.mark.parametrize("labels", ['""', '";"', '" ; "'])
def test_row_without_labels_names_its_line(tmp_path, labels):
    path = tmp_path / "data.csv"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    path.write_text(f"path,labels\na.png,red;blue\na.png,{labels}\n")
    with pytest.raises(UsageError, match=r"line 3: .*no labels"):
        read_manifest(path)


def test_test_label_unseen_in_training_is_refused(tmp_path):
    rows = [("red;green", "train"), ("green", "train"), ("red;blue", "test")]
    with pytest.raises(UsageError, match=r"line 4: label 'blue' of a test image has no training image"):
        read_manifest(_write_csv(tmp_path, rows, "path,labels,split"))


def test_label_and_labels_columns_together_are_refused(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("path,label,labels\na.png,red,red\n")
    with pytest.raises(UsageError, match="both a label and a labels column"):
        read_manifest(path)


def test_load_folder_multilabel_dataset(tmp_path):
    sets = _sets(12)
    path = _write_csv(tmp_path, [(s,) for s in sets])
    ds = load_folder(str(path), progress=False, store="memory")
    assert ds.multilabel and ds.train_y.dtype == torch.float32
    assert ds.train_y.shape == (len(ds.train_x), 3) and ds.test_y.shape == (len(ds.test_x), 3)
    assert "(multi-label)" in ds.summary()
    # The pixels match the labels of the same file (train and test kept in step).
    for x, y in zip(ds.test_x, ds.test_y, strict=True):
        names = [ds.classes[c] for c in torch.nonzero(y).flatten().tolist()]
        present = {n for n, rgb in COLOURS.items() if (x.reshape(-1, 3) == torch.tensor(rgb)).all(1).any()}
        assert present == set(names)


# --------------------------------------------------------------------------- metrics


def test_metrics_match_sklearn_on_random_data():
    rng = np.random.default_rng(3)
    n, c = 200, 7
    y = (rng.random((n, c)) < 0.3).astype(np.float32)
    y[:, 4] = 0  # a class with no positive: skipped in mAP and macro-F1
    logits = np.round(rng.normal(size=(n, c)) + 1.5 * y, 1)  # rounded: ties, as sklearn groups them
    m = multilabel.metrics(torch.from_numpy(logits), torch.from_numpy(y), [f"c{i}" for i in range(c)])
    keep = [i for i in range(c) if i != 4]
    ref_ap = [average_precision_score(y[:, i], logits[:, i]) for i in keep]
    assert [m["ap_per_class"][f"c{i}"] for i in keep] == pytest.approx(ref_ap, abs=1e-12)
    assert m["ap_per_class"]["c4"] is None and m["classes_skipped"] == 1
    assert m["map"] == pytest.approx(np.mean(ref_ap), abs=1e-12)
    pred = (1 / (1 + np.exp(-logits)) > 0.5).astype(int)
    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro"), abs=1e-12)
    ref_macro = f1_score(y[:, keep], pred[:, keep], average="macro", zero_division=0)
    assert m["macro_f1"] == pytest.approx(ref_macro, abs=1e-12)
    assert m["exact_match"] == pytest.approx(np.mean((pred == y).all(1)))


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_sklearn_with_heavy_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(50) < 0.4
    y[0] = True
    scores = rng.integers(0, 4, 50).astype(float)
    assert multilabel.average_precision(scores, y) == pytest.approx(average_precision_score(y, scores))


def test_knn_scores_against_a_loop():
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(30, 5, generator=g), torch.randn(7, 5, generator=g)
    bank_y = (torch.rand(30, 4, generator=g) < 0.4).float()
    got = multilabel.knn_scores(bank, bank_y, query, k=6, temperature=0.2)
    b, q = F.normalize(bank, dim=1), F.normalize(query, dim=1)
    for i in range(len(query)):
        sim = b @ q[i]
        top = sim.argsort(descending=True)[:6]
        w = torch.exp(sim[top] / 0.2)
        ref = (w[:, None] * bank_y[top]).sum(0) / w.sum()
        torch.testing.assert_close(got[i], ref)


def test_one_vs_rest_loss_and_exact_match():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, -0.2], [0.1, 0.1, 0.1]])
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    p = torch.sigmoid(logits)
    ref = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    torch.testing.assert_close(classifier_loss(logits, y), ref)
    assert int(correct_predictions(logits, y)) == 2  # row 1 misses class 2
    ids = torch.tensor([0, 1, 2])
    torch.testing.assert_close(classifier_loss(logits, ids), F.cross_entropy(logits, ids))
    assert int(correct_predictions(logits, ids)) == 2


def test_validation_split_of_multilabel_data_is_seeded_random():
    x = torch.arange(20).view(20, 1, 1, 1).to(torch.uint8)
    y = (torch.rand(20, 3, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    tx, ty, vx, vy = split_validation(x, y, 0.25, seed=4)
    assert len(vy) == 5 and len(ty) == 15
    torch.testing.assert_close(vy, y[vx.flatten().long()])
    assert vx.flatten().tolist() == split_validation(x, y, 0.25, seed=4)[2].flatten().tolist()
    assert set(tx.flatten().tolist()) | set(vx.flatten().tolist()) == set(range(20))


# --------------------------------------------------------------------------- refusals


def _tiny_multilabel() -> ImageDataset:
    x = torch.zeros(6, 4, 4, 3, dtype=torch.uint8)
    y = torch.tensor([[1, 0], [0, 1], [1, 1], [1, 0], [0, 1], [1, 1]], dtype=torch.float32)
    return ImageDataset("m", x, y, x, y, ["a", "b"])


@pytest.mark.parametrize("kind", ["class-balanced", "sqrt"])
def test_class_samplers_refuse_multilabel(kind):
    with pytest.raises(UsageError, match=f"data.sampler={kind}.*multi-label"):
        order_fn(_tiny_multilabel().train_y, kind)
    assert order_fn(_tiny_multilabel().train_y, "uniform") is None  # the plain shuffle works


def test_accuracy_refuses_multilabel():
    from supcon.evaluation.evaluate import accuracy

    with pytest.raises(UsageError, match="accuracy.*multi-label"):
        accuracy(torch.zeros(6, dtype=torch.long), _tiny_multilabel().test_y)


def test_long_tail_refuses_multilabel():
    with pytest.raises(UsageError, match="data.imbalance.*multi-label"):
        long_tailed(_tiny_multilabel(), 10)


def test_report_table_shows_multilabel_metrics():
    row = {"experiment": "ce", "map": 0.5, "micro_f1": 0.25, "macro_f1": None, "train_seconds": 1.0}
    row["ap_per_class"], row["classes_skipped"] = {"a": 0.5, "b": None}, 1
    text = table([row])
    assert "mAP" in text and "50.00%" in text and "25.00%" in text and "n/a" in text
    assert "test accuracy" not in text
    assert metric_text(row) == "mAP 50.00%, micro-F1 25.00%, macro-F1 n/a"
    lines = ap_lines([row])
    assert "| a | 50.00% |" in lines and "| b | n/a |" in lines


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_compare_on_a_tiny_multilabel_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPCON_DATA", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    path = _write_csv(data, [(s,) for s in _sets(40)], size=12)
    overrides = {
        "data.path": str(path), "data.dataset": None, "data.val_fraction": 0.2, "precision": "fp32",
        "ce.epochs": 2, "pretrain.epochs": 2, "linear.epochs": 2, "ce.batch_size": 16,
        "pretrain.batch_size": 16, "linear.batch_size": 16, "knn_every": 1, "knn_k": 5,
        "loss.multilabel": "any",
    }  # fmt: skip
    out = tmp_path / "run"
    results = supcon.run("compare", out=out, overrides=overrides, progress=False)
    for row in results["rows"]:
        assert "test_acc" not in row and set(row["ap_per_class"]) == {"blue", "green", "red"}
        assert 0 <= row["map"] <= 1 and 0 <= row["micro_f1"] <= 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"][0]["ap_per_class"] == results["rows"][0]["ap_per_class"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("train_acc" in m for m in metrics if m.get("phase") == "ce")  # exact match
    assert any("val_map" in m for m in metrics if m.get("phase") == "ce")
    assert any("val_knn_map" in m for m in metrics if m.get("phase") == "pretrain")
    report = (out / "report.md").read_text()
    assert "mAP" in report and "Average precision per class" in report and "t-SNE map not drawn" in report
    # The saved models give the same test metrics again.
    again = supcon.run("eval", from_dir=out)["rows"]
    assert again[0]["map"] == pytest.approx(results["rows"][0]["map"])
    assert again[1]["map"] == pytest.approx(results["rows"][1]["map"])
    knn = again[2]  # the pre-trained encoder's kNN: vote shares as scores, read at 0.5 themselves
    assert knn["experiment"].startswith("pre-trained encoder, kNN") and 0 <= knn["map"] <= 1
    # As a Python object: label sets, from each class's sigmoid.
    model = supcon.load(out)
    probs = model.predict_proba(np.zeros((3, 12, 12, 3), np.uint8))
    logits = model.outputs(torch.zeros(3, 12, 12, 3, dtype=torch.uint8), "classifier")
    np.testing.assert_allclose(probs, logits.sigmoid().numpy(), rtol=1e-5)
    sets = model.predict(np.zeros((3, 12, 12, 3), np.uint8))
    assert sets == [[c for c, p in zip(model.classes, row, strict=True) if p > 0.5] for row in probs]


@pytest.mark.slow
def test_class_balanced_sampler_on_multilabel_run_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPCON_DATA", str(tmp_path / "cache"))
    path = _write_csv(tmp_path, [(s,) for s in _sets(10)], size=12)
    overrides = {"data.path": str(path), "data.dataset": None, "data.sampler": "class-balanced"}
    with pytest.raises(UsageError, match="multi-label"):
        supcon.run("train-ce", out=tmp_path / "run", overrides=overrides, progress=False)
