"""An example lcc-harness method plugin: `noise-r{pct}` adds seeded Gaussian noise to every target weight,
with standard deviation pct % of each row's RMS. Registered through the `lcc_harness.methods` entry point."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from lcc_harness.methods import CompressContext, Method
from lcc_harness.methods.registry import check_range


@dataclass(frozen=True)
class WeightNoise(Method):
    pct: float = 1.0

    family = "noise"
    pattern = re.compile(r"noise-r(?P<pct>\d+(?:\.\d+)?)")
    forms = ("noise-r{pct}",)
    examples = ("noise-r1", "noise-r5")
    description = "example plugin: Gaussian noise with std = pct % of each weight row's RMS (seeded)"

    def __post_init__(self) -> None:
        check_range(self.id, "pct", self.pct, 0.0, 100.0, "noise-r{0..100}")

    @property
    def id(self) -> str:
        return f"noise-r{self.pct:g}"

    @classmethod
    def from_match(cls, m: re.Match[str]) -> WeightNoise:
        return cls(pct=float(m["pct"]))

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        for name, lin in ctx.linears(model):
            w = lin.weight
            rms = w.float().pow(2).mean(dim=1, keepdim=True).sqrt()  # (out, 1)
            noise = torch.randn(w.shape, generator=ctx.generator(name)) * rms.cpu() * (self.pct / 100)
            w.add_(noise.to(w.device, w.dtype))
        return model
