"""Mixed-precision weight RTN: a few groups per layer kept at 8 bits, the rest at b bits.

`mixed` keeps the groups with the largest max|w| (the paper's remedy for outlier weights); two controls
with the same budget (the same k groups per layer) pick them at random (`mixed-random`) or by
activation-weighted quantization error (`mixed-saliency`). `mixed-random` takes an optional mask seed
(`mixed-random-w3-g64-p2-seed3`): the random groups then come from S and the layer name only, not from the run's
sample seed; without it they come from the run's seed, as before the suffix existed. A group is G consecutive input weights of one
output row, quantized asymmetrically (min-max, integer zero point) as in `rtn`.

Budget per layer: k = floor(pct/100 · n_groups + 1/2) (round half up, computed exactly from the decimal pct),
n_groups = out_features · in_features / G. Ranking ties go to the lower flat index (row-major: output row,
then group along the input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import ClassVar

import torch
from torch import nn

from lcc_harness.errors import MethodError
from lcc_harness.methods._calib import InputStats, layer_stats
from lcc_harness.methods._quant import effective_bits, fake_quant_groups, resolve_group
from lcc_harness.methods.basic import group_token
from lcc_harness.methods.registry import MAX_MASK_SEED, CompressContext, WeightMethod, param, register

HIGH_BITS = 8  # precision of the kept groups
DEFAULT_PCT = 2.0


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
class _Mixed(WeightMethod):
    """Shared validation and application; subclasses choose which groups stay at 8 bits (`_select`)."""

    bits: int = param(3, 2, 8)
    group: int = param(128, 0, 1 << 20, hint="divisor of the input width, 0 = per channel")
    pct: float = param(DEFAULT_PCT, 0, 100)

    selection: ClassVar[str] = ""
    form_suffix: ClassVar[str] = ""  # an optional part every form of the family ends with

    def __init_subclass__(cls, **kwargs: object) -> None:
        if "family" in cls.__dict__:
            cls.forms = _forms(cls.family, cls.form_suffix)
        super().__init_subclass__(**kwargs)

    def validate(self) -> None:
        if self.pct >= 100:
            raise MethodError(
                f"method '{self._draft_id()}': pct={self.pct} keeps every group at 8 bits; use "
                f"rtn-w8-{group_token(self.group)} for that, or write {self.forms[0]} with pct < 100"
            )

    def _select(
        self, name: str, w: torch.Tensor, g: int, k: int, ctx: CompressContext, stats: dict[str, InputStats]
    ) -> torch.Tensor:
        """(O, I/G) bool mask with exactly k True entries: the groups of w (O, I) kept at 8 bits."""
        raise NotImplementedError

    def _stats(
        self, model: nn.Module, linears: list[tuple[str, nn.Linear]], ctx: CompressContext
    ) -> dict[str, InputStats]:
        return {}

    def prepare(self, model: nn.Module, linears: list[tuple[str, nn.Linear]], ctx: CompressContext) -> dict:
        groups = {name: resolve_group(lin.in_features, self.group, f" of {name}") for name, lin in linears}
        # statistics from the uncompressed model, before any layer changes
        return {"groups": groups, "stats": self._stats(model, linears, ctx), "high": 0, "total": 0}

    def transform(self, name: str, lin: nn.Linear, ctx: CompressContext, state: dict) -> float:
        g = state["groups"][name]
        w = lin.weight  # (O, I)
        n_groups = w.numel() // g
        k = high_precision_count(n_groups, self.pct)
        high = self._select(name, w, g, k, ctx, state["stats"])  # (O, I/G)
        lin.weight.copy_(mixed_fake_quant(w, self.bits, g, high))
        state["high"] += k
        state["total"] += n_groups
        hi, lo = (effective_bits(b, g, lin.in_features, False) for b in (HIGH_BITS, self.bits))
        return (k * hi + (n_groups - k) * lo) / n_groups

    def finish(self, ctx: CompressContext, state: dict) -> None:
        ctx.info["high_precision_groups"] = state["high"]
        ctx.info["high_precision_fraction"] = state["high"] / max(state["total"], 1)
        ctx.info["high_precision_selection"] = self.selection
        if hasattr(self, "mask_seed"):
            ctx.info["mask_seed"] = ctx.seed if self.mask_seed is None else self.mask_seed
            ctx.info["mask_seed_from"] = "run seed" if self.mask_seed is None else "method id"


def _forms(prefix: str, suffix: str = "") -> tuple[str, ...]:
    """Ids always carry -p{pct}; on input it may be left out (then pct = DEFAULT_PCT)."""
    return (f"{prefix}-w{{bits}}-g{{group}}-p{{pct}}{suffix}", f"{prefix}-w{{bits}}-g{{group}}{suffix}")


_DESC = (
    "weight-only RTN, bits 2-8, per group of G input channels (g0 = per channel), asymmetric; "
    "in each layer k = round-half-up(pct% of its groups) groups stay at 8 bits ({how}); "
    "pct defaults to 2"
)


@register
@dataclass(frozen=True)
class MixedMaxAbs(_Mixed):
    """The remedy: the k groups with the largest max|w| of each layer stay at 8 bits."""

    family, selection = "mixed", "max_abs"
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
    """Control: k groups per layer chosen uniformly at random by an explicit generator seeded from the mask seed
    (`-seed{S}`; without it, the run's seed) and the layer name."""

    mask_seed: int | None = param(None, 0, MAX_MASK_SEED, label="mask seed", hint="S >= 0")

    family, selection = "mixed-random", "random"
    form_suffix = "[-seed{mask_seed}]"
    examples = ("mixed-random-w3-g128-p2", "mixed-random-w3-g64-p2-seed3")
    description = _DESC.format(
        how="chosen at random, seeded per layer; a control for `mixed`; -seed{S}: the groups from seed S, "
        "independent of the run's sample seed (default: the run's seed)"
    )

    def _select(
        self, name: str, w: torch.Tensor, g: int, k: int, ctx: CompressContext, stats: dict[str, InputStats]
    ) -> torch.Tensor:
        out_f, in_f = w.shape
        n = out_f * (in_f // g)
        gen = ctx.generator(name, seed=self.mask_seed)  # the run's seed when mask_seed is None
        chosen = torch.randperm(n, generator=gen)[:k]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[chosen] = True
        return mask.view(out_f, in_f // g).to(w.device)


@register
@dataclass(frozen=True)
class MixedSaliency(_Mixed):
    """Control: groups ranked by Σ_j ((w_j − q_b(w_j))·‖X_j‖₂)² with ‖X_j‖₂ from calibration inputs."""

    family, selection = "mixed-saliency", "saliency"
    needs_calibration = True
    examples = ("mixed-saliency-w3-g128-p2",)
    description = _DESC.format(
        how="the largest activation-weighted b-bit error Σ((w-q_b(w))·‖X_j‖₂)²; "
        "needs calibration; a control for `mixed`"
    )

    def _stats(
        self, model: nn.Module, linears: list[tuple[str, nn.Linear]], ctx: CompressContext
    ) -> dict[str, InputStats]:
        return layer_stats(self.id, model, linears, ctx.calibration)

    def _select(
        self, name: str, w: torch.Tensor, g: int, k: int, ctx: CompressContext, stats: dict[str, InputStats]
    ) -> torch.Tensor:
        out_f, in_f = w.shape
        q_low = fake_quant_groups(w, self.bits, g)  # (O, I), what the group would become at b bits
        norm = stats[name].col_norm.to(w.device)  # (I,) ‖X_j‖₂
        err = (w.float() - q_low.float()) * norm  # (O, I)
        return top_k_mask(err.pow(2).view(out_f, in_f // g, g).sum(-1), k)  # (O, n)
