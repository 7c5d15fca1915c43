"""Long-tailed training sets (the LDAM-DRW profile and selection) and the many/medium/few report."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from supcon.core.config import Config, DataConfig, validate
from supcon.core.errors import UsageError
from supcon.core.registry import DATASETS
from supcon.data.dataset import ImageDataset
from supcon.data.datasets import load_split
from supcon.data.longtail import class_counts, long_tailed, profile
from supcon.evaluation.longtail import class_groups, group_accuracy, group_report

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def reference_counts(img_max: int, cls_num: int, imb_factor: float) -> list[int]:
    # LDAM-DRW's get_img_num_per_cls ('exp'), written out as it stands there.
    return [int(img_max * (imb_factor ** (i / (cls_num - 1.0)))) for i in range(cls_num)]


def reference_selection(targets: np.ndarray, counts: list[int]) -> np.ndarray:
    # LDAM-DRW's gen_imbalanced_data with rand_number=0: the global NumPy seed, one shuffle per class.
    state = np.random.get_state()
    try:
        np.random.seed(0)
        kept = []
        for the_class, the_img_num in zip(np.unique(targets), counts, strict=True):
            idx = np.where(targets == the_class)[0]
            np.random.shuffle(idx)
            kept.append(idx[:the_img_num])
    finally:
        np.random.set_state(state)
    return np.sort(np.concatenate(kept))


def test_profile_matches_the_published_benchmarks():
    assert profile(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    # Training-set sizes of CIFAR-10-LT and CIFAR-100-LT as reported in the literature.
    assert sum(profile(5000, 10, 100)) == 12406
    assert sum(profile(5000, 10, 50)) == 13996
    assert sum(profile(5000, 10, 10)) == 20431
    assert sum(profile(500, 100, 100)) == 10847
    assert sum(profile(500, 100, 10)) == 19573
    for n_max, classes, imbalance in [(5000, 10, 100), (500, 100, 100), (500, 100, 50), (37, 7, 3.5)]:
        assert profile(n_max, classes, imbalance) == reference_counts(n_max, classes, 1 / imbalance)
    assert profile(40, 4, 1) == [40] * 4


def _dataset(per_class: list[int], seed: int = 0, paths: bool = False) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    y = y[torch.randperm(len(y), generator=g)]  # classes interleaved, as in a real training set
    x = torch.randint(0, 256, (len(y), 4, 4, 3), generator=g, dtype=torch.uint8)
    test_y = torch.arange(len(per_class)).repeat(3)
    test_x = torch.randint(0, 256, (len(test_y), 4, 4, 3), generator=g, dtype=torch.uint8)
    names = [f"class{c}" for c in range(len(per_class))]
    train_paths = [f"img{i}.png" for i in range(len(y))] if paths else None
    return ImageDataset("toy", x, y, test_x, test_y, names, train_paths=train_paths)


def test_long_tailed_keeps_the_reference_images_and_a_balanced_test_set():
    data = _dataset([60] * 5, paths=True)
    lt = long_tailed(data, 10)
    want_counts = reference_counts(60, 5, 0.1)
    assert class_counts(lt.train_y, 5) == want_counts == [60, 33, 18, 10, 6]
    keep = torch.from_numpy(reference_selection(data.train_y.numpy(), want_counts))
    assert torch.equal(lt.train_y, data.train_y[keep])
    assert torch.equal(lt.train_x, data.train_x[keep])
    assert lt.train_paths == [data.train_paths[i] for i in keep.tolist()]
    assert lt.test_x is data.test_x and torch.equal(lt.test_y, data.test_y)
    assert lt.name == "toy-lt" and data.name == "toy"  # the original is untouched
    assert len(data.train_y) == 300


def test_unequal_classes_take_the_smallest_as_the_head():
    # n_max is the smallest class, so every class can supply its share of the profile.
    lt = long_tailed(_dataset([50, 80, 40]), 4)
    assert class_counts(lt.train_y, 3) == [40, 20, 10]


def test_bad_imbalance_and_an_emptied_class_are_refused():
    data = _dataset([12, 12, 12])
    with pytest.raises(UsageError, match="at least 1"):
        long_tailed(data, 0.5)
    emptied = r"class 2 \('class2'\) with no training images \(the head class keeps 12\)"
    with pytest.raises(UsageError, match=emptied):
        long_tailed(data, 20)  # 12 / 20 < 1
    with pytest.raises(UsageError, match="data.imbalance must be at least 1"):
        validate(Config(data=DataConfig(imbalance=0.9)))
    with pytest.raises(UsageError, match="data.sampler must be one of"):
        from supcon.core.config import set_values

        set_values(Config(), {"data.sampler": "square-root"})


def test_group_accuracy_against_a_hand_count():
    train_counts = [500, 101, 100, 20, 19, 0]
    assert class_groups(train_counts) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    y = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    pred = torch.tensor([0, 1, 1, 2, 0, 3, 4, 0])
    acc = group_accuracy(pred, y, train_counts)
    assert acc == pytest.approx({"overall": 5 / 8, "many": 2 / 3, "medium": 2 / 3, "few": 1 / 2})
    # No class in a group: reported as absent (None), never as 0.
    acc = group_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1]), [300, 50])
    assert acc == {"overall": 1.0, "many": 1.0, "medium": 1.0, "few": None}


def test_group_report_only_for_imbalanced_training_sets():
    balanced, lt = _dataset([30, 30, 25]), _dataset([150, 30, 10])
    pred = lt.test_y.clone()
    assert group_report(pred, balanced, None) == {}  # max/min 1.2
    assert group_report(None, lt, None) == {}  # no predictions (a kNN row)
    assert group_report(pred, balanced, 1.0)["group_acc"]["overall"] == 1.0  # asked for
    assert group_report(pred, lt, None) == {
        "group_acc": {"overall": 1.0, "many": 1.0, "medium": 1.0, "few": 1.0}
    }


def _write_cifar10(folder, per_class: int):
    """A tiny CIFAR-10 copy in the official python format (5 training batches, a test batch)."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    y = rng.permutation(np.repeat(np.arange(10), per_class))
    x = rng.integers(0, 256, size=(len(y), 3 * 32 * 32), dtype=np.uint8)
    for i, part in enumerate(np.array_split(np.arange(len(y)), 5)):
        batch = {b"data": x[part], b"labels": y[part].tolist(), b"batch_label": b"training batch"}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {b"data": x[:20], b"labels": [c % 10 for c in range(20)]}
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    meta = {b"label_names": [n.encode() for n in CIFAR10_NAMES]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return y


def test_cifar10_lt_from_a_copy_by_name_or_by_imbalance(tmp_path):
    y = _write_cifar10(tmp_path / "cifar-10-batches-py", per_class=20)
    assert {"cifar10-lt", "cifar100-lt"} <= set(DATASETS.names())
    by_name, split = load_split(DataConfig(dataset="cifar10-lt", path=str(tmp_path), imbalance=10), 0, False)
    counts = reference_counts(20, 10, 0.1)
    assert class_counts(by_name.train_y, 10) == counts == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]
    assert torch.equal(by_name.train_y, torch.from_numpy(y[reference_selection(y, counts)]))
    assert torch.equal(split.train_y, by_name.train_y)  # no validation split asked for
    assert class_counts(by_name.test_y, 10) == [2] * 10  # the test set stays balanced
    # The recognised copy (dataset None) with data.imbalance gives the same training set.
    recognised, _ = load_split(DataConfig(dataset=None, path=str(tmp_path), imbalance=10), 0, False)
    assert torch.equal(recognised.train_x, by_name.train_x) and recognised.name == "cifar10-lt"
    # Without data.imbalance the -lt dataset takes the benchmarks' 100: too steep for 20 per class.
    with pytest.raises(UsageError, match=r"class 6 \('frog'\) and 3 more with no"):
        load_split(DataConfig(dataset="cifar10-lt", path=str(tmp_path)), 0, False)


def test_digits_with_imbalance_and_a_validation_split():
    data, split = load_split(DataConfig(dataset="digits", imbalance=10, val_fraction=0.1), 0, False)
    full, _ = load_split(DataConfig(dataset="digits"), 0, False)
    n_max = min(class_counts(full.train_y, 10))
    assert class_counts(data.train_y, 10) == profile(n_max, 10, 10)
    assert len(split.train_y) + len(split.val_y) == len(data.train_y)
    assert torch.equal(data.test_y, full.test_y)


def test_an_image_folder_takes_the_same_profile(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("SUPCON_DATA", str(tmp_path / "cache"))  # the decode cache
    root = tmp_path / "pets"
    for split, n in (("train", 8), ("test", 2)):
        for c, name in enumerate(["cat", "dog", "owl"]):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (4, 4), (10 * c, i, 0)).save(root / split / name / f"{i}.png")
    data, _ = load_split(DataConfig(dataset=None, path=str(root), imbalance=4), 0, False)
    assert class_counts(data.train_y, 3) == [8, 4, 2] and data.name == "pets-lt"
    assert class_counts(data.test_y, 3) == [2, 2, 2]
    # Each kept image is one of its class's own (red encodes the class).
    assert torch.equal(data.train_x[:, 0, 0, 0].long(), 10 * data.train_y)


@pytest.mark.slow
def test_results_rows_carry_group_accuracy(tmp_path):
    import supcon

    overrides = {
        "data.dataset": "digits",
        "data.imbalance": 10,
        "data.sampler": "sqrt",
        "ce.epochs": 1,
        "ce.batch_size": 64,
        "precision": "fp32",
    }
    results = supcon.run("train-ce", "keras-example", tmp_path / "run", overrides=overrides, progress=False)
    row = json.loads((tmp_path / "run" / "results.json").read_text())["rows"][0]
    assert row == results["rows"][0]
    groups = row["group_acc"]
    assert groups["overall"] == pytest.approx(row["test_acc"])
    # digits has at most ~135 training images per class: at imbalance 10, 13 to 135 per class.
    assert set(groups) == {"overall", "many", "medium", "few"}
    assert all(v is None or 0 <= v <= 1 for v in groups.values())
