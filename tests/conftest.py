"""Shared fixtures for the harness's own tests: the tiny random model, built once, and a harness on it."""

from __future__ import annotations

import pytest
from _tiny import tiny_config

from lcc_harness.models import LoadedModel, load_model
from lcc_harness.run import Harness


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return load_model("tiny-llama", "cpu")


@pytest.fixture()
def cache_dir(tmp_path):
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def harness(tiny) -> Harness:
    """A default harness on the tiny model (one per test module: tests may compress and measure on it)."""
    return Harness(tiny_config(), lm=tiny)
