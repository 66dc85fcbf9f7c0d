"""The identity method and weight-only round-to-nearest (RTN)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ._quant import effective_bits, fake_quant_groups, resolve_group
from .registry import CompressContext, Method, check_range, register


@register
@dataclass(frozen=True)
class Identity(Method):
    family = "none"
    pattern = re.compile(r"none")
    forms = ("none",)
    examples = ("none",)
    description = "identity: the uncompressed model (KL must be ~0; checks the harness itself)"

    @property
    def id(self) -> str:
        return "none"

    @classmethod
    def from_match(cls, m: re.Match[str]) -> Identity:
        return cls()

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        return model


def group_token(group: int) -> str:
    return f"g{group}" if group > 0 else "g0"


@register
@dataclass(frozen=True)
class RTN(Method):
    """Weight-only round-to-nearest per group; asymmetric min-max with an integer zero point by default."""

    bits: int = 4
    group: int = 128
    sym: bool = False

    family = "rtn"
    pattern = re.compile(r"rtn-w(?P<bits>\d+)-g(?P<group>\d+)(?P<sym>-sym)?")
    forms = ("rtn-w{bits}-g{group}[-sym]",)
    examples = ("rtn-w3-g128", "rtn-w4-g128", "rtn-w8-g0-sym")
    description = (
        "weight-only round-to-nearest, bits 2-8, per group of G input channels (g0 = per "
        "channel), asymmetric min-max with integer zero point; -sym for symmetric"
    )

    def __post_init__(self) -> None:
        check_range(self.id, "bits", self.bits, 2, 8, "rtn-w{2..8}-g{group}")
        check_range(
            self.id, "group", self.group, 0, 1 << 20, "rtn-w{bits}-g{divisor of input width, 0=per channel}"
        )

    @property
    def id(self) -> str:
        return f"rtn-w{self.bits}-{group_token(self.group)}" + ("-sym" if self.sym else "")

    @classmethod
    def from_match(cls, m: re.Match[str]) -> RTN:
        return cls(bits=int(m["bits"]), group=int(m["group"]), sym=bool(m["sym"]))

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        n_weights = 0.0
        n_bits = 0.0
        for name, lin in ctx.linears(model):
            resolve_group(lin.in_features, self.group, f" of {name}")
            lin.weight.copy_(fake_quant_groups(lin.weight, self.bits, self.group, self.sym))
            n_weights += lin.weight.numel()
            n_bits += lin.weight.numel() * effective_bits(self.bits, self.group, lin.in_features, self.sym)
        ctx.info["effective_bits"] = n_bits / max(n_weights, 1)
        return model
