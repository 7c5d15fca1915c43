"""A single-label class present only in the test split is said in one line (its test images cannot be
classified correctly); multi-label data and held-out evaluation are left alone."""

import torch

from supcon.data.dataset import ImageDataset
from supcon.experiments import unseen_classes, warn_unseen_classes


def _data(train_y, test_y, classes=("a", "b", "c", "d")):
    x = torch.zeros(len(train_y), 2, 2, 3, dtype=torch.uint8)
    xt = torch.zeros(len(test_y), 2, 2, 3, dtype=torch.uint8)
    return ImageDataset("t", x, torch.tensor(train_y), xt, torch.tensor(test_y), list(classes))


def test_classes_only_in_test_are_warned_about(capsys):
    data = _data([0, 1, 1], [0, 2, 3, 3])
    assert unseen_classes(data) == ["c", "d"]
    warn_unseen_classes(data)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 class(es) only in the test split" in err and "c, d" in err


def test_many_unseen_classes_are_listed_briefly(capsys):
    classes = [f"k{i}" for i in range(1000)]
    warn_unseen_classes(_data([0], list(range(1000)), classes))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "and 994 more" in err and len(err) < 300


def test_nothing_to_say(capsys):
    warn_unseen_classes(_data([0, 1, 2, 3], [3, 2]))
    warn_unseen_classes(_data([0, 1], []))
    multi = ImageDataset(
        "m",
        *(torch.zeros(2, 2, 2, 3, dtype=torch.uint8), torch.tensor([[1, 0], [1, 0]])) * 1,
        torch.zeros(2, 2, 2, 3, dtype=torch.uint8),
        torch.tensor([[0, 1], [0, 1]]),
        ["a", "b"],
    )
    assert unseen_classes(multi) == []
    assert capsys.readouterr().err == ""
