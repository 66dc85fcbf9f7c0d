"""Deliberately faulty compression methods for the fault tests (registered only by `register_all`).

fault-raise            apply raises ZeroDivisionError
fault-nan / fault-inf  apply writes NaN / +Inf into one weight
fault-inf-logits       weights stay finite; the LM head emits +Inf logits
fault-oom-{N}          the forward raises torch.OutOfMemoryError for inputs longer than N tokens
fault-cpuoom-{N}       the same with the CPU allocator's RuntimeError text
fault-sleep            touches $LCC_TEST_MARKER, then sleeps (to be interrupted)
fault-kill             the process kills itself with SIGKILL (an OOM-killed or crashing xdist worker)
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lcc_harness.methods.registry import CompressContext, Method, register, unregister


@dataclass(frozen=True)
class _Fixed(Method):
    """A parameterless method whose only form (and so its id and pattern) is its family name."""

    def __init_subclass__(cls, **kw: object) -> None:
        cls.forms = (cls.__dict__.get("family", ""),) if "family" in cls.__dict__ else ()
        super().__init_subclass__(**kw)


@dataclass(frozen=True)
class Raise(_Fixed):
    family = "fault-raise"

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        raise ZeroDivisionError("kaboom in apply")


@dataclass(frozen=True)
class NaN(_Fixed):
    family = "fault-nan"

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
        return model


@dataclass(frozen=True)
class Inf(_Fixed):
    family = "fault-inf"

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        with torch.no_grad():
            model.model.layers[1].self_attn.v_proj.weight[3, 5] = float("inf")
        return model


@dataclass(frozen=True)
class InfLogits(_Fixed):
    family = "fault-inf-logits"

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[..., 7] = float("inf")
            return out

        model.get_output_embeddings().register_forward_hook(hook)
        return model


@dataclass(frozen=True)
class OOM(Method):
    """Raises an out-of-memory error in the forward for inputs longer than `limit` tokens."""

    limit: int = 128
    family = "fault-oom"
    pattern = re.compile(r"fault-oom-(?P<n>\d+)")
    forms = ("fault-oom-{N}",)
    error = "CUDA out of memory. Tried to allocate 12.00 GiB"

    @property
    def id(self) -> str:
        return f"{self.family}-{self.limit}"

    @classmethod
    def from_match(cls, m: re.Match[str]) -> Method:
        return cls(int(m["n"]))

    def raise_oom(self) -> None:
        raise torch.OutOfMemoryError(self.error)

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids")
            if ids is not None and ids.shape[-1] > self.limit:
                self.raise_oom()

        model.model.register_forward_pre_hook(hook, with_kwargs=True)
        return model


@dataclass(frozen=True)
class CpuOOM(OOM):
    family = "fault-cpuoom"
    pattern = re.compile(r"fault-cpuoom-(?P<n>\d+)")
    forms = ("fault-cpuoom-{N}",)

    def raise_oom(self) -> None:
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"
        )


@dataclass(frozen=True)
class Sleep(_Fixed):
    family = "fault-sleep"

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        Path(os.environ["LCC_TEST_MARKER"]).write_text("started")
        time.sleep(120)
        return model


@dataclass(frozen=True)
class Kill(_Fixed):
    family = "fault-kill"

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        os.kill(os.getpid(), signal.SIGKILL)
        return model


FAMILIES = (Raise, NaN, Inf, InfLogits, OOM, CpuOOM, Sleep, Kill)


def register_all() -> None:
    for cls in FAMILIES:
        register(cls)


def unregister_all() -> None:
    for cls in FAMILIES:
        unregister(cls.family)
