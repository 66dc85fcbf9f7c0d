"""Growth statistics and the paper's findings as verdicts.

Growth of a method = slope of window KL against log2(length), divided by its mean window KL ("relative slope":
the fraction of its own mean by which KL rises per doubling of context). Its 90 % confidence interval comes from
a bootstrap over samples (seeded). Verdicts:
  rising        — CI lower bound > RISING (KL grows by more than 5 % of its mean per doubling, confidently);
  flat          — CI inside (−FLAT, +FLAT) and not rising (|growth| < 10 % of the mean per doubling);
  inconclusive  — anything else (too noisy, or falling).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

RISING = 0.05
FLAT = 0.10
CI_LEVEL = 0.90
N_BOOT = 2000


@dataclass(frozen=True)
class Growth:
    """Growth statistics; every number is None (verdict 'n/a') when KL at the shortest length is ~0."""

    ratio: float | None  # mean window KL at the longest length ÷ at the shortest
    ratio_se: float | None  # bootstrap standard error of `ratio`
    rel_slope: float | None  # d(window KL)/d(log2 L) ÷ mean window KL
    ci: tuple[float | None, float | None]  # CI_LEVEL bootstrap interval of rel_slope
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"] = list(self.ci)
        return d


def _matrix(per_sample: Mapping[int, Sequence[float]], lengths: Sequence[int]) -> np.ndarray:
    return np.array([list(per_sample[L]) for L in lengths], dtype=np.float64).T  # (n_samples, n_lengths)


def _rel_slope(curve: np.ndarray, x: np.ndarray) -> np.ndarray:
    """curve (..., k) mean KL per length → relative slope per row (...,)."""
    xc = x - x.mean()
    slope = (curve * xc).sum(-1) / (xc**2).sum()
    return slope / curve.mean(-1)


def bootstrap_index(n: int, seed: int, n_boot: int = N_BOOT) -> np.ndarray:
    """(n_boot, n) resampling indices from a seeded generator."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def growth(
    per_sample: Mapping[int, Sequence[float]], lengths: Sequence[int], seed: int = 0, floor: float = 0.0
) -> Growth:
    """Growth statistics from per-sample window KL at each length; undefined (None, 'n/a') when the mean at
    the shortest length is not above gate.GROWTH_MIN_FLOORS × `floor` (0/0, or a ratio of float noise)."""
    from .gate import growth_ratio

    lengths = sorted(lengths)
    m = _matrix(per_sample, lengths)  # (n, k)
    x = np.log2(np.array(lengths, dtype=np.float64))
    mean = m.mean(0)
    if growth_ratio(m[:, 0].tolist(), m[:, -1].tolist(), floor) is None:
        return Growth(None, None, None, (None, None), "n/a")
    ratio = float(mean[-1] / mean[0])
    if len(lengths) < 2:  # one length: no slope
        return Growth(ratio, 0.0, None, (None, None), "n/a")
    rel = float(_rel_slope(mean, x))
    boot = m[bootstrap_index(m.shape[0], seed)].mean(1)  # (B, k)
    ratios = boot[:, -1] / boot[:, 0]
    slopes = _rel_slope(boot, x)
    a = (1 - CI_LEVEL) / 2
    lo, hi = (float(v) for v in np.quantile(slopes, [a, 1 - a]))
    return Growth(ratio, float(np.std(ratios, ddof=1)), rel, (lo, hi), verdict(lo, hi))


def verdict(lo: float, hi: float) -> str:
    """'rising', 'flat' or 'inconclusive' from the CI of the relative slope (NaN → inconclusive)."""
    if lo > RISING:
        return "rising"
    if lo > -FLAT and hi < FLAT:
        return "flat"
    return "inconclusive"


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """Relative difference mean(a)/mean(b) − 1 and its CI_LEVEL bootstrap interval (paired over samples)."""
    av, bv = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    idx = bootstrap_index(len(av), seed)
    d = av[idx].mean(1) / bv[idx].mean(1) - 1
    alpha = (1 - CI_LEVEL) / 2
    lo, hi = np.quantile(d, [alpha, 1 - alpha])
    return float(av.mean() / bv.mean() - 1), float(lo), float(hi)


def _lower(point: float, lo: float, hi: float) -> str:
    """'yes' when a is confidently lower than b, 'no' when confidently not lower, else 'inconclusive'."""
    if hi < 0:
        return "yes"
    if lo >= 0:
        return "no"
    return "inconclusive"


def _combine(parts: Sequence[str]) -> str:
    if parts and all(p == "yes" for p in parts):
        return "yes"
    if any(p == "yes" for p in parts):
        return "partly"
    if any(p == "no" for p in parts):
        return "no"
    return "inconclusive"


@dataclass(frozen=True)
class Finding:
    """One claim evaluated on one run: `holds` is yes / partly / no / inconclusive."""

    claim: str
    title: str
    paper: str
    measured: str
    holds: str
    detail: str
    methods: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Claim:
    """A claim of the paper: the roles (profile method slots) it compares and how it is judged.
    `judge(roles, curves, lengths, growth, seed)` returns (holds, paper, measured, detail)."""

    name: str
    title: str
    roles: tuple[str, ...]
    judge: Callable[..., tuple[str, str, str, str]]


CLAIMS: dict[str, Claim] = {}


def claim(name: str, title: str, roles: tuple[str, ...]) -> Callable:
    """Decorator registering a claim's judge under `name` (a duplicate name is a ValueError)."""

    def deco(fn: Callable[..., tuple[str, str, str, str]]) -> Callable:
        if name in CLAIMS:
            raise ValueError(f"claim '{name}' is registered twice")
        CLAIMS[name] = Claim(name, title, roles, fn)
        return fn

    return deco


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _desc(method: str, x: Growth) -> str:
    if x.ratio is None:
        return f"{method}: n/a (KL ~0 at the shortest length)"
    return (
        f"{method}: {x.verdict} (rel. slope {x.rel_slope:+.3f}/doubling, 90 % CI "
        f"[{x.ci[0]:+.3f}, {x.ci[1]:+.3f}], growth ×{x.ratio:.3g})"
    )


def _rises(v: str) -> str:
    return "yes" if v == "rising" else "no" if v == "flat" else "inconclusive"


@claim(
    "pruning-flat", "Pruning (magnitude, Wanda) stays roughly flat as context grows", ("magnitude", "wanda")
)
def _pruning_flat(roles, curves, lengths, g, seed):
    rs = ("magnitude", "wanda")
    parts = [
        "yes" if g[r].verdict == "flat" else "no" if g[r].verdict == "rising" else "inconclusive" for r in rs
    ]
    measured = "; ".join(f"{roles[r]}: {g[r].verdict}" for r in rs)
    return _combine(parts), "flat", measured, "; ".join(_desc(roles[r], g[r]) for r in rs)


@claim(
    "lowbit-rises",
    "Low-bit weight quantization rises with context (3-bit clearly; 4-bit reported)",
    ("rtn3", "rtn4"),
)
def _lowbit_rises(roles, curves, lengths, g, seed):
    measured = f"{roles['rtn3']}: {g['rtn3'].verdict}; {roles['rtn4']}: {g['rtn4'].verdict}"
    detail = f"{_desc(roles['rtn3'], g['rtn3'])}; {_desc(roles['rtn4'], g['rtn4'])}"
    return _rises(g["rtn3"].verdict), "rising", measured, detail


@claim(
    "remedy-mitigates",
    "Keeping ~2 % of groups (largest magnitude) at 8 bits lowers long-context KL "
    "and its growth vs plain 3-bit, and beats random selection at equal budget",
    ("rtn3", "mixed3", "mixed3_random"),
)
def _remedy_mitigates(roles, curves, lengths, g, seed):
    Lmax = max(lengths)
    w_m, w_r, w_c = (curves[roles[r]][Lmax] for r in ("mixed3", "rtn3", "mixed3_random"))
    kl = paired_difference(w_m, w_r, seed)
    ctrl = paired_difference(w_m, w_c, seed)
    m3, r3 = g["mixed3"], g["rtn3"]
    slope_lower = (
        "inconclusive"
        if None in (*m3.ci, *r3.ci)
        else "yes"
        if m3.ci[1] < r3.ci[0]
        else "no"
        if m3.ci[0] >= r3.ci[1]
        else "inconclusive"
    )
    parts = [_lower(*kl), slope_lower, _lower(*ctrl)]
    measured = (
        f"KL@{Lmax} vs {roles['rtn3']}: {kl[0]:+.1%} ({parts[0]}); growth lower: {parts[1]}; "
        f"vs random control: {ctrl[0]:+.1%} ({parts[2]})"
    )
    detail = (
        f"window KL at {Lmax}: {roles['mixed3']} {_fmt(np.mean(w_m))}, {roles['rtn3']} "
        f"{_fmt(np.mean(w_r))} ({kl[0]:+.1%}, 90 % CI [{kl[1]:+.1%}, {kl[2]:+.1%}]), "
        f"{roles['mixed3_random']} {_fmt(np.mean(w_c))} ({ctrl[0]:+.1%}, CI [{ctrl[1]:+.1%}, "
        f"{ctrl[2]:+.1%}]); {_desc(roles['mixed3'], m3)}; {_desc(roles['rtn3'], r3)}"
    )
    return _combine(parts), "lower KL, lower growth, beats random", measured, detail


@claim("random-prune-rises", "Randomly pruning 10 % of weights gives a rising KL", ("random10",))
def _random_prune_rises(roles, curves, lengths, g, seed):
    v = g["random10"].verdict
    return _rises(v), "rising", f"{roles['random10']}: {v}", _desc(roles["random10"], g["random10"])


def evaluate_claim(
    name: str,
    roles: Mapping[str, str],
    curves: Mapping[str, Mapping[int, Sequence[float]]],
    lengths: Sequence[int],
    seed: int = 0,
) -> dict[str, Any]:
    """One finding as a dict (Finding.to_dict). curves: method id → {length: per-sample window KL}; every
    method of the claim's roles must be present."""
    c = CLAIMS[name]
    lengths = sorted(lengths)
    g = {r: growth(curves[roles[r]], lengths, seed) for r in c.roles}
    holds, paper, measured, detail = c.judge(roles, curves, lengths, g, seed)
    return Finding(name, c.title, paper, measured, holds, detail, [roles[r] for r in c.roles]).to_dict()
