"""--pretrained that is not a weights file, or whose weights are not finite: one line saying so."""

import os

import pytest
import torch
from safetensors.torch import save_file

from supcon.core.errors import UsageError
from supcon.models.pretrained import load_pretrained, read_tensors


def _encoder():
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def test_a_folder_is_said_to_be_a_folder(tmp_path):
    (tmp_path / "w.safetensors").mkdir()
    for path in (tmp_path, tmp_path / "w.safetensors"):
        with pytest.raises(UsageError, match="is a folder"):
            read_tensors(path)
    with pytest.raises(UsageError, match="not found"):
        read_tensors(tmp_path / "missing.pt")


def test_a_fifo_is_not_read(tmp_path):
    os.mkfifo(tmp_path / "w.pt")
    with pytest.raises(UsageError, match="not a regular file"):
        read_tensors(tmp_path / "w.pt")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_non_finite_weights_are_named_not_reported_as_divergence(tmp_path, bad, suffix):
    state = {k: v.clone() for k, v in _encoder().state_dict().items()}
    state["1.weight"][0, 0] = bad
    path = tmp_path / f"w{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    enc = _encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    with pytest.raises(UsageError, match=r"NaN or infinite values \(1 tensors: 1.weight\)"):
        load_pretrained(enc, path, verbose=False)
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # untouched
