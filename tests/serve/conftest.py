"""Fixtures of the tests of a trained run: the one tiny digits run (tests/_trained.py) and its
models loaded for inference, shared within a test module."""

import pytest
from tests._trained import trained_run

import supcon


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def model(run):
    return supcon.load(run, device="cpu")
