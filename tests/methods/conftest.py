"""Fixtures shared by the method tests: the tiny model (one copy per module, as nn.Module), a fresh copy per test,
and `device`, which runs a test on the CPU and, where CUDA is present, on the GPU too."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def tiny(tiny) -> nn.Module:  # noqa: F811 - extends the root conftest's LoadedModel fixture
    """The tiny random Llama as a module, copied once per test module (tests may change it)."""
    return copy.deepcopy(tiny.model)


@pytest.fixture(scope="module")
def tiny_model(tiny: nn.Module) -> nn.Module:
    return tiny


@pytest.fixture
def model(tiny: nn.Module) -> nn.Module:
    """A fresh copy of the tiny model for one test."""
    return copy.deepcopy(tiny)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)
