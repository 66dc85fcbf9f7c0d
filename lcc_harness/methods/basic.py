"""The identity method and weight-only round-to-nearest (RTN)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lcc_harness.methods._quant import GroupGrid, effective_bits, fake_quant_groups, resolve_group
from lcc_harness.methods.registry import CompressContext, EngineSpec, Method, WeightMethod, register


@register
@dataclass(frozen=True)
class Identity(Method):
    family = "none"
    engines = ("torch", "llama.cpp")
    forms = ("none",)
    examples = ("none",)
    description = "identity: the uncompressed model (KL must be ~0; checks the harness itself)"

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        return model

    def engine_spec(self) -> EngineSpec:
        return EngineSpec()


def group_token(group: int) -> str:
    return f"g{group}" if group > 0 else "g0"


@register
@dataclass(frozen=True)
class RTN(WeightMethod, GroupGrid):
    """Weight-only round-to-nearest per group; asymmetric min-max with an integer zero point by default."""

    family, examples = "rtn", ("rtn-w3-g128", "rtn-w4-g128", "rtn-w8-g0-sym")
    description = (
        "weight-only round-to-nearest, bits 2-8, per group of G input channels (g0 = per "
        "channel), asymmetric min-max with integer zero point; -sym for symmetric"
    )

    def transform(self, name: str, lin: nn.Linear, ctx: CompressContext, state: None) -> float:
        resolve_group(lin.in_features, self.group, f" of {name}")
        lin.weight.copy_(fake_quant_groups(lin.weight, self.bits, self.group, self.sym))
        return effective_bits(self.bits, self.group, lin.in_features, self.sym)
