"""Shared fixtures for the harness's own tests: the tiny random model, built once."""

from __future__ import annotations

import pytest

from lcc_harness.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return load_model("tiny-llama", "cpu")


@pytest.fixture()
def cache_dir(tmp_path):
    return tmp_path / "cache"
