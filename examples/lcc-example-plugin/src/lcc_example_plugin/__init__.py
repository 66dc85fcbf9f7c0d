"""An example lcc-harness method plugin: `noise-r{pct}` adds seeded Gaussian noise to every target weight,
with standard deviation pct % of each row's RMS. Registered through the `lcc_harness.methods` entry point."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lcc_harness.methods import CompressContext, WeightMethod, param


@dataclass(frozen=True)
class WeightNoise(WeightMethod):
    pct: float = param(1.0, 0.0, 100.0)

    family = "noise"
    forms = ("noise-r{pct}",)
    examples = ("noise-r1", "noise-r5")
    description = "example plugin: Gaussian noise with std = pct % of each weight row's RMS (seeded)"

    def transform(self, name: str, lin: nn.Linear, ctx: CompressContext, state: None) -> None:
        w = lin.weight
        rms = w.float().pow(2).mean(dim=1, keepdim=True).sqrt()  # (out, 1)
        noise = torch.randn(w.shape, generator=ctx.generator(name)) * rms.cpu() * (self.pct / 100)
        w.add_(noise.to(w.device, w.dtype))
        return None  # not a quantizer: no bits to report
