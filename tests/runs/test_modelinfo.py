"""model.json: what a run's weights need to be used again, with every "auto" that shapes them decided."""

import json

import pytest
import torch

from supcon.core.config import Config
from supcon.data.dataset import ImageDataset
from supcon.runs.modelinfo import model_info, read_model_info, write_model_info


def _data(size: int) -> ImageDataset:
    x = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    return ImageDataset("tiny", x, torch.tensor([0, 1]), x, torch.tensor([0, 1]), ["a", "b"])


@pytest.mark.parametrize("size, stem", [(16, "cifar"), (63, "cifar"), (64, "imagenet"), (224, "imagenet")])
def test_the_resolved_stem_is_stored_not_auto(size, stem):
    cfg = Config()
    cfg.model.encoder = "resnet18"
    assert cfg.model.stem == "auto"
    info = model_info(cfg, _data(size))
    assert info["model"]["stem"] == stem
    assert cfg.model.stem == "auto"  # the config itself is left as asked


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_an_explicit_stem_is_kept(stem):
    cfg = Config()
    cfg.model.stem = stem
    assert model_info(cfg, _data(64))["model"]["stem"] == stem


def test_written_and_read_back(tmp_path):
    cfg = Config()
    write_model_info(tmp_path, cfg, _data(16))
    info = read_model_info(tmp_path)
    assert info == json.loads((tmp_path / "model.json").read_text())
    assert info["image_size"] == 16 and info["classes"] == ["a", "b"]
    assert info["preprocess"] == {"resize": "square", "size": 16, "interpolation": "bilinear"}
