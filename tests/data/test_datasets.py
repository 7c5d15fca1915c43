import pytest
import torch

from supcon.core.errors import UsageError
from supcon.data.datasets import load_dataset, split_validation


def test_digits_shapes_and_split_fixed_by_seed():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=0)
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape[1:] == (16, 16, 3)
    assert len(a.train_y) + len(a.test_y) == 1797 and a.num_classes == 10
    assert torch.equal(a.train_y, b.train_y) and torch.equal(a.test_x, b.test_x)
    assert int(a.train_x.max()) == 255
    c = load_dataset("digits", seed=1)
    assert not torch.equal(a.train_y, c.train_y)


def test_digits_image_size_must_be_multiple_of_8():
    assert load_dataset("digits", image_size=32).image_size == 32
    with pytest.raises(UsageError, match="multiples of 8"):
        load_dataset("digits", image_size=12)


def test_unknown_dataset_and_missing_path():
    with pytest.raises(UsageError, match="digits"):
        load_dataset("mnist-nope")
    with pytest.raises(UsageError, match="does not exist"):
        load_dataset(None, "/no/such/folder")


def test_validation_split_is_stratified_and_disjoint():
    d = load_dataset("digits")
    x, y, vx, vy = split_validation(d.train_x, d.train_y, 0.2, seed=0)
    assert len(y) + len(vy) == len(d.train_y)
    assert set(vy.tolist()) == set(range(10))
    counts = torch.bincount(vy, minlength=10).float() / torch.bincount(d.train_y, minlength=10).float()
    assert torch.all((counts - 0.2).abs() < 0.05)
    x0, y0, vx0, _ = split_validation(d.train_x, d.train_y, 0.0, seed=0)
    assert len(vx0) == 0 and len(y0) == len(d.train_y)


@pytest.mark.parametrize(
    "name, kwargs, key",
    [
        ("cifar10", {"image_size": 64}, "data.image_size"),
        ("cifar100", {"image_size": 32}, "data.image_size"),
        ("cifar10-lt", {"test_fraction": 0.5}, "data.test_fraction"),
        ("cifar10", {"store": "disk"}, "data.store"),
        ("digits", {"path": "/tmp"}, "data.path"),
        ("digits", {"store": "memory"}, "data.store"),
    ],
)
def test_an_argument_the_dataset_cannot_honour_is_refused_not_ignored(name, kwargs, key):
    # Refused before anything is read or downloaded: the path of a CIFAR copy is never looked at.
    with pytest.raises(UsageError, match=rf"^{key} .*does not apply to dataset '{name}'"):
        load_dataset(name, **kwargs)


def test_defaults_and_the_loops_own_arguments_pass_silently():
    d = load_dataset("digits", seed=0, progress=False, store="auto", test_fraction=0.2, imbalance=None)
    assert d.image_size == 16
