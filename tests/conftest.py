"""Shared fixtures for the harness's own tests: the tiny random model, built once, and a harness on it."""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path

import pytest
from _tiny import tiny_config

from lcc_harness.engines.torch.harness import Harness
from lcc_harness.models.load import LoadedModel, load_model


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


@pytest.fixture()
def offline(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No network and an empty Hugging Face cache (returned: HF_HOME). The env vars are read at import, so the
    constants are patched too. Modules that must never reach out use it for every test (`pytestmark`)."""
    import huggingface_hub.constants as hf_constants

    hf_home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))

    def refuse(self: socket.socket, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"test tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return hf_home


SUITES = Path(__file__).resolve().parents[1] / "suites"


@pytest.fixture()
def project(pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory) -> pytest.Pytester:
    """A user project with the shipped suites, the smoke profile, and its own reference cache."""
    for f in SUITES.glob("test_*.py"):
        pytester.makepyfile(**{f.stem: f.read_text()})
    pytester.makeini(
        textwrap.dedent(f"""
        [pytest]
        lcc_profile = smoke
        lcc_cache_dir = {tmp_path_factory.mktemp("cache")}
        """)
    )
    return pytester
