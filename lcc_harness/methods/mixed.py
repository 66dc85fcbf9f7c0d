"""Mixed-precision weight RTN: a few groups per layer kept at 8 bits, the rest at b bits.

`mixed` keeps the groups with the largest max|w| (the paper's remedy for outlier weights); two controls
with the same budget (the same k groups per layer) pick them at random (`mixed-random`) or by
activation-weighted quantization error (`mixed-saliency`). A group is G consecutive input weights of one
output row, quantized asymmetrically (min-max, integer zero point) as in `rtn`.

Budget per layer: k = floor(pct/100 · n_groups + 1/2) (round half up, computed exactly from the decimal pct),
n_groups = out_features · in_features / G. Ranking ties go to the lower flat index (row-major: output row,
then group along the input).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import ClassVar

import torch
from torch import nn

from ..errors import MethodError
from ._calib import InputStats, collect_input_stats
from ._quant import effective_bits, fake_quant_groups, resolve_group
from .basic import group_token
from .registry import CompressContext, Method, check_range, register

HIGH_BITS = 8  # precision of the kept groups
DEFAULT_PCT = 2.0


def format_pct(pct: float) -> str:
    """Shortest plain decimal that reads back as `pct` (2.0 → '2', 0.5 → '0.5'; never exponent form)."""
    return format(Decimal(repr(float(pct))).normalize(), "f")


def high_precision_count(n_groups: int, pct: float) -> int:
    """k = floor(pct/100 · n_groups + 1/2): round half up, exact (no float error at .5 boundaries)."""
    exact = Fraction(Decimal(repr(float(pct)))) * n_groups / 100
    return min(n_groups, max(0, math.floor(exact + Fraction(1, 2))))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of `scores` (any shape); ties go to the lower flat index."""
    flat = scores.reshape(-1).float()
    order = torch.sort(-flat, stable=True).indices  # descending, stable → lower index first among equals
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(scores.shape)


def mixed_fake_quant(w: torch.Tensor, bits: int, group: int, high: torch.Tensor) -> torch.Tensor:
    """RTN of w (O, I) per group of G: groups where high (O, I/G) is True at 8 bits, others at `bits`."""
    out_f, in_f = w.shape
    g = resolve_group(in_f, group)
    q_low = fake_quant_groups(w, bits, g).view(out_f, in_f // g, g)  # (O, n, G)
    q_high = fake_quant_groups(w, HIGH_BITS, g).view(out_f, in_f // g, g)
    return torch.where(high.to(w.device).unsqueeze(-1), q_high, q_low).reshape(out_f, in_f)


@dataclass(frozen=True)
class _Mixed(Method):
    """Shared id handling, validation and application; subclasses choose which groups stay at 8 bits."""

    bits: int = 3
    group: int = 128
    pct: float = DEFAULT_PCT

    prefix: ClassVar[str] = ""
    selection: ClassVar[str] = ""

    def __post_init__(self) -> None:
        form = f"{self.prefix}-w{{2..8}}-g{{divisor of input width, 0=per channel}}-p{{0 <= pct < 100}}"
        check_range(self.id, "bits", self.bits, 2, 8, form)
        check_range(self.id, "group", self.group, 0, 1 << 20, form)
        check_range(self.id, "pct", self.pct, 0, 100, form)
        if self.pct >= 100:
            raise MethodError(
                f"method '{self.id}': pct={self.pct} keeps every group at 8 bits; use "
                f"rtn-w8-{group_token(self.group)} for that, or write {form}"
            )

    @property
    def id(self) -> str:
        return f"{self.prefix}-w{self.bits}-{group_token(self.group)}-p{format_pct(self.pct)}"

    @classmethod
    def from_match(cls, m: re.Match[str]) -> _Mixed:
        pct = float(m["pct"]) if m["pct"] is not None else DEFAULT_PCT
        return cls(bits=int(m["bits"]), group=int(m["group"]), pct=pct)

    def _select(
        self, name: str, w: torch.Tensor, g: int, k: int, ctx: CompressContext, stats: dict[str, InputStats]
    ) -> torch.Tensor:
        """(O, I/G) bool mask with exactly k True entries: the groups of w (O, I) kept at 8 bits."""
        raise NotImplementedError

    def _stats(
        self, model: nn.Module, linears: list[tuple[str, nn.Linear]], ctx: CompressContext
    ) -> dict[str, InputStats]:
        return {}

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        linears = ctx.linears(model)
        groups = {name: resolve_group(lin.in_features, self.group, f" of {name}") for name, lin in linears}
        stats = self._stats(model, linears, ctx)  # from the uncompressed model, before any layer changes
        n_weights = n_bits = 0.0
        n_high = n_total = 0
        for name, lin in linears:
            g = groups[name]
            w = lin.weight  # (O, I)
            n_groups = w.numel() // g
            k = high_precision_count(n_groups, self.pct)
            high = self._select(name, w, g, k, ctx, stats)  # (O, I/G)
            lin.weight.copy_(mixed_fake_quant(w, self.bits, g, high))
            n_high += k
            n_total += n_groups
            n_weights += w.numel()
            n_bits += g * (
                k * effective_bits(HIGH_BITS, g, lin.in_features, False)
                + (n_groups - k) * effective_bits(self.bits, g, lin.in_features, False)
            )
        ctx.info["effective_bits"] = n_bits / max(n_weights, 1)
        ctx.info["high_precision_groups"] = n_high
        ctx.info["high_precision_fraction"] = n_high / max(n_total, 1)
        ctx.info["high_precision_selection"] = self.selection
        return model


def _pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix) + r"-w(?P<bits>\d+)-g(?P<group>\d+)(?:-p(?P<pct>\d+(?:\.\d+)?))?")


_DESC = (
    "weight-only RTN, bits 2-8, per group of G input channels (g0 = per channel), asymmetric; "
    "in each layer k = round-half-up(pct% of its groups) groups stay at 8 bits ({how}); "
    "pct defaults to 2"
)


@register
@dataclass(frozen=True)
class MixedMaxAbs(_Mixed):
    """The remedy: the k groups with the largest max|w| of each layer stay at 8 bits."""

    family = "mixed"
    prefix = "mixed"
    selection = "max_abs"
    pattern = _pattern("mixed")
    forms = ("mixed-w{bits}-g{group}[-p{pct}]",)
    examples = ("mixed-w3-g128-p2", "mixed-w3-g64-p2", "mixed-w2-g128-p0.5")
    description = _DESC.format(how="the groups with the largest max|w|")

    def _select(
        self, name: str, w: torch.Tensor, g: int, k: int, ctx: CompressContext, stats: dict[str, InputStats]
    ) -> torch.Tensor:
        out_f, in_f = w.shape
        return top_k_mask(w.float().view(out_f, in_f // g, g).abs().amax(-1), k)  # (O, n)


@register
@dataclass(frozen=True)
class MixedRandom(_Mixed):
    """Control: k groups per layer chosen uniformly at random, seeded by ctx.generator(layer name)."""

    family = "mixed-random"
    prefix = "mixed-random"
    selection = "random"
    pattern = _pattern("mixed-random")
    forms = ("mixed-random-w{bits}-g{group}[-p{pct}]",)
    examples = ("mixed-random-w3-g128-p2",)
    description = _DESC.format(how="chosen at random, seeded per layer; a control for `mixed`")

    def _select(
        self, name: str, w: torch.Tensor, g: int, k: int, ctx: CompressContext, stats: dict[str, InputStats]
    ) -> torch.Tensor:
        out_f, in_f = w.shape
        n = out_f * (in_f // g)
        chosen = torch.randperm(n, generator=ctx.generator(name))[:k]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[chosen] = True
        return mask.view(out_f, in_f // g).to(w.device)


@register
@dataclass(frozen=True)
class MixedSaliency(_Mixed):
    """Control: groups ranked by Σ_j ((w_j − q_b(w_j))·‖X_j‖₂)² with ‖X_j‖₂ from calibration inputs."""

    family = "mixed-saliency"
    prefix = "mixed-saliency"
    selection = "saliency"
    needs_calibration = True
    pattern = _pattern("mixed-saliency")
    forms = ("mixed-saliency-w{bits}-g{group}[-p{pct}]",)
    examples = ("mixed-saliency-w3-g128-p2",)
    description = _DESC.format(
        how="the largest activation-weighted b-bit error Σ((w-q_b(w))·‖X_j‖₂)²; "
        "needs calibration; a control for `mixed`"
    )

    def _stats(
        self, model: nn.Module, linears: list[tuple[str, nn.Linear]], ctx: CompressContext
    ) -> dict[str, InputStats]:
        if not ctx.calibration:
            raise MethodError(
                f"method '{self.id}' needs calibration spans (activation norms); none were given"
            )
        stats = collect_input_stats(model, linears, ctx.calibration)
        missing = [name for name, _ in linears if name not in stats]
        if missing:
            raise MethodError(
                f"method '{self.id}': calibration never reached {', '.join(missing[:3])}; "
                "exclude those layers or use `mixed`"
            )
        return stats

    def _select(
        self, name: str, w: torch.Tensor, g: int, k: int, ctx: CompressContext, stats: dict[str, InputStats]
    ) -> torch.Tensor:
        out_f, in_f = w.shape
        q_low = fake_quant_groups(w, self.bits, g)  # (O, I), what the group would become at b bits
        norm = stats[name].col_norm.to(w.device)  # (I,) ‖X_j‖₂
        err = (w.float() - q_low.float()) * norm  # (O, I)
        return top_k_mask(err.pow(2).view(out_f, in_f // g, g).sum(-1), k)  # (O, n)
