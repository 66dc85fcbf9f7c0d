"""Unstructured and N:M semi-structured weight pruning: magnitude, Wanda and random.

Every family prunes each output row of every target Linear on its own (per-output comparison group):
- `{family}-s{P}`: zero exactly k = round(P/100 · in_features) weights per row (Python `round`, i.e. half to
  even), the k lowest scores; P is a percent with 0 < P < 100, written without trailing zeros (s50, s12.5).
- `{family}-{N}:{M}`: keep at most N of every M consecutive input weights of a row (NVIDIA 2:4 convention),
  i.e. zero the M−N lowest scores of each group; M must divide the input width of every target Linear.
Scores: magnitude |W_ij|; Wanda |W_ij| · ‖X_j‖₂ (input column norms over the calibration tokens, collected in
one pass on the dense model); random: uniform noise from an explicit generator seeded per layer. Ties go to the
lower input index (stable sort), so results are deterministic.

Random pruning takes an optional mask seed, `random-s{P}-seed{S}` / `random-{N}:{M}-seed{S}`: the mask then comes
from S and the layer name only, so the run's sample seed no longer picks it. Without the suffix the mask comes
from the run's seed (the id and masks of `random-s10` are unchanged by the suffix's introduction).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import ClassVar

import torch
from torch import nn

from lcc_harness.errors import MethodError
from lcc_harness.methods._calib import layer_stats
from lcc_harness.methods.registry import MAX_MASK_SEED, CompressContext, WeightMethod, check_range, register

_NUM = r"-?\d+(?:\.\d+)?"


def format_percent(p: float) -> str:
    """Shortest decimal that round-trips `p`, without exponent or trailing zeros: 50.0 → '50', 12.5 → '12.5'."""
    if not math.isfinite(p):
        return str(p)
    return format(Decimal(repr(float(p))).normalize(), "f")


def rows_prune_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (O, I): True at the k lowest scores of each row of `scores` (O, I); ties → lower index."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.argsort(scores, dim=1, stable=True)[:, :k]  # (O, k)
        mask.scatter_(1, idx, True)
    return mask


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask (O, I): True at the M−N lowest scores of every group of M consecutive inputs of a row."""
    out_f, in_f = scores.shape
    groups = scores.reshape(out_f, in_f // m, m)  # (O, I/M, M)
    idx = torch.argsort(groups, dim=2, stable=True)[..., : m - n]  # (O, I/M, M-N)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(out_f, in_f)


@dataclass(frozen=True)
class _Prune(WeightMethod):
    """Shared shape of the three pruning families; subclasses set `family` and `scores`.

    percent: sparsity in percent for `-s{P}`; in N:M mode (m > 0) it is derived as 100·(M−N)/M.
    """

    percent: float | None = None
    n: int = 0
    m: int = 0

    seeded: ClassVar[bool] = False  # the family takes an optional -seed{S} suffix (field `mask_seed`)

    def __post_init__(self) -> None:
        fam = self.family
        seed = getattr(self, "mask_seed", None)
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_MASK_SEED
        ):
            raise MethodError(
                f"method '{fam}': mask seed {seed!r} must be a whole number in [0, 2**62]; write it as "
                f"{fam}-s{{P}}-seed{{S}}, e.g. {fam}-s10-seed3"
            )
        if self.m or self.n:
            form = f"{fam}-{{N}}:{{M}} with integers 0 < N < M, e.g. {fam}-2:4"
            check_range(self.id, "M", self.m, 2, 1 << 20, form)
            check_range(self.id, "N", self.n, 1, self.m - 1, form)
            implied = 100.0 * (self.m - self.n) / self.m
            if self.percent is not None and not math.isclose(self.percent, implied):
                raise MethodError(
                    f"method '{self.id}': percent={self.percent} contradicts N:M sparsity "
                    f"{format_percent(implied)}%; give either percent or N:M, not both"
                )
            object.__setattr__(self, "percent", implied)
            return
        if self.percent is None:
            object.__setattr__(self, "percent", 50.0)
        p = float(self.percent)
        if not (0.0 < p < 100.0):
            raise MethodError(
                f"method '{self.id}': sparsity {format_percent(p)}% is out of range; write it as "
                f"{fam}-s{{P}} with a percent 0 < P < 100 (e.g. {fam}-s50, {fam}-s12.5), "
                f"or {fam}-{{N}}:{{M}} for N:M sparsity"
            )

    def __init_subclass__(cls, **kwargs: object) -> None:
        fam = cls.__dict__.get("family")
        if fam:  # every pruning family writes its ids the same two ways (parsed with N:M-specific errors)
            seed = "[-seed{S}]" if cls.seeded else ""
            cls.forms = (f"{fam}-s{{P}}{seed}", f"{fam}-{{N}}:{{M}}{seed}")
            cls.pattern = _pattern(fam, cls.seeded)
        super().__init_subclass__(**kwargs)

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def id(self) -> str:
        seed = getattr(self, "mask_seed", None)
        suffix = "" if seed is None else f"-seed{seed}"
        if self.m or self.n:
            return f"{self.family}-{self.n}:{self.m}{suffix}"
        return f"{self.family}-s{format_percent(50.0 if self.percent is None else self.percent)}{suffix}"

    @classmethod
    def from_match(cls, mt: re.Match[str]) -> _Prune:
        kw: dict[str, int] = {}
        seed_txt = mt.groupdict().get("seed")
        if seed_txt is not None:
            if "." in seed_txt or seed_txt.startswith("-"):
                raise MethodError(
                    f"method '{mt.group(0)}': the mask seed must be a whole number >= 0, got {seed_txt}; "
                    f"write it as {cls.family}-s{{P}}-seed{{S}}, e.g. {cls.family}-s10-seed3"
                )
            kw["mask_seed"] = int(seed_txt)
        if mt["pct"] is not None:
            return cls(percent=float(mt["pct"]), **kw)
        n_txt, m_txt = mt["n"], mt["m"]
        if "." in n_txt or "." in m_txt or n_txt.startswith("-") or m_txt.startswith("-"):
            raise MethodError(
                f"method '{mt.group(0)}': N:M needs whole numbers 0 < N < M, got {n_txt}:{m_txt}; "
                f"write it as {cls.family}-{{N}}:{{M}}, e.g. {cls.family}-2:4"
            )
        return cls(n=int(n_txt), m=int(m_txt), **kw)

    def scores(self, name: str, lin: nn.Linear, ctx: CompressContext, state: dict) -> torch.Tensor:
        """Importance (out, in) float32 on the weight's device; the lowest scores are pruned."""
        raise NotImplementedError

    def statistics(
        self, model: nn.Module, linears: list[tuple[str, nn.Linear]], ctx: CompressContext
    ) -> dict:
        """Anything the scores need computed once for all layers (e.g. calibration statistics)."""
        return {}

    def prepare(self, model: nn.Module, linears: list[tuple[str, nn.Linear]], ctx: CompressContext) -> dict:
        if self.structured:
            for name, lin in linears:
                if lin.in_features % self.m:
                    raise MethodError(
                        f"method '{self.id}': groups of M={self.m} do not divide the input "
                        f"width {lin.in_features} of {name}; choose an M that divides every "
                        "target Linear's input width (e.g. 2:4), or exclude that layer"
                    )
        return {"stats": self.statistics(model, linears, ctx), "zero": 0, "total": 0}

    def transform(self, name: str, lin: nn.Linear, ctx: CompressContext, state: dict) -> None:
        w = lin.weight  # (O, I)
        s = self.scores(name, lin, ctx, state["stats"])  # (O, I) float32
        if self.structured:
            mask = nm_prune_mask(s, self.n, self.m)
        else:
            mask = rows_prune_mask(s, round(self.percent * lin.in_features / 100))
        w.masked_fill_(mask, 0)
        state["zero"] += int((w == 0).sum())
        state["total"] += w.numel()
        return None  # pruning keeps the weights' precision: no bits to report

    def finish(self, ctx: CompressContext, state: dict) -> None:
        ctx.info["sparsity"] = state["zero"] / max(state["total"], 1)


def _pattern(family: str, seeded: bool = False) -> re.Pattern[str]:
    seed = rf"(?:-seed(?P<seed>{_NUM}))?" if seeded else ""
    return re.compile(rf"{family}-(?:s(?P<pct>{_NUM})|(?P<n>{_NUM}):(?P<m>{_NUM})){seed}")


_FORMS_NOTE = "0 < P < 100 percent per output row, or N:M = at most N nonzeros in every M consecutive inputs"


@register
@dataclass(frozen=True)
class MagnitudePrune(_Prune):
    """Zero the weights of smallest |W| in each output row (or each group of M)."""

    family, examples = "magnitude", ("magnitude-s50", "magnitude-2:4")
    description = (
        f"magnitude pruning: remove the weights of smallest magnitude abs(W) per output row; {_FORMS_NOTE}"
    )

    def scores(self, name: str, lin: nn.Linear, ctx: CompressContext, state: dict) -> torch.Tensor:
        return lin.weight.detach().float().abs()


@register
@dataclass(frozen=True)
class WandaPrune(_Prune):
    """Wanda (Sun et al. 2023): score |W_ij| · ‖X_j‖₂, compared per output row; statistics from the dense model."""

    needs_calibration = True
    family, examples = "wanda", ("wanda-s50", "wanda-2:4")
    description = (
        f"Wanda pruning: remove the lowest abs(W_ij)·norm2(X_j) per output row (calibration "
        f"inputs of the dense model); {_FORMS_NOTE}"
    )

    def statistics(
        self, model: nn.Module, linears: list[tuple[str, nn.Linear]], ctx: CompressContext
    ) -> dict:
        stats = layer_stats(self.id, model, linears, ctx.calibration)
        return {name: st.col_norm for name, st in stats.items()}

    def scores(self, name: str, lin: nn.Linear, ctx: CompressContext, state: dict) -> torch.Tensor:
        w = lin.weight.detach()
        norm = state[name].to(device=w.device, dtype=torch.float32)  # (I,)
        return w.float().abs() * norm[None, :]


@register
@dataclass(frozen=True)
class RandomPrune(_Prune):
    """Zero uniformly random weights in each output row (or group of M). The mask comes from an explicit generator
    seeded by the mask seed (`-seed{S}`; without it, the run's seed) and the layer name."""

    mask_seed: int | None = None

    seeded = True
    family, examples = "random", ("random-s10", "random-2:4", "random-s10-seed3")
    description = (
        f"random pruning (a floor for the other criteria), seeded per layer; {_FORMS_NOTE}; -seed{{S}}: "
        "the mask from seed S, independent of the run's sample seed (default: the run's seed)"
    )

    def scores(self, name: str, lin: nn.Linear, ctx: CompressContext, state: dict) -> torch.Tensor:
        g = ctx.generator(name, seed=self.mask_seed)  # the run's seed when mask_seed is None
        noise = torch.rand(lin.weight.shape, generator=g, dtype=torch.float32)  # (O, I) on the CPU
        return noise.to(lin.weight.device)

    def finish(self, ctx: CompressContext, state: dict) -> None:
        super().finish(ctx, state)
        ctx.info["mask_seed"] = ctx.seed if self.mask_seed is None else self.mask_seed
        ctx.info["mask_seed_from"] = "run seed" if self.mask_seed is None else "method id"
