"""Growth with context, per sample: relative slopes of window KL against log2(length), the growth ratio's
interval, log-log growth exponents of the matched-target curves and their paired contrasts; the verdicts
'rising', 'flat' or 'inconclusive'."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lcc_harness.measure.stats import (
    Contrast,
    paired_contrast,
    t_interval,
)

# The smallest floor per dtype (gate.floor_from_self_noise explains it) and how many floors a KL must exceed
# before a growth ratio or exponent is more than float noise.
FLOOR_MIN = {"float32": 1e-6, "bfloat16": 1e-3, "float16": 2e-4}
GROWTH_MIN_FLOORS = 100.0  # below 100 floors the ratio carries ≥ 1 % float noise: growth is n/a

RISING = 0.0  # directional, as the claims: the interval lies wholly above 0


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def growth_ratio(first: Sequence[float], last: Sequence[float], floor: float) -> float | None:
    """Mean window KL at the longest length ÷ at the shortest; None when the shortest is within
    GROWTH_MIN_FLOORS floors of zero (the ratio would be float noise, or 0/0)."""
    lo = _mean(first)
    if not lo > GROWTH_MIN_FLOORS * floor:
        return None
    return _mean(last) / lo


FLAT = 0.02  # the margin of 'flat': |relative slope| < 2 % of the level per doubling, the whole interval


CI_LEVEL = 0.90


@dataclass(frozen=True)
class Growth:
    """Growth statistics; every number is None (verdict 'n/a') when KL at the shortest length is ~0."""

    ratio: float | None  # mean window KL at the longest length ÷ at the shortest
    ratio_se: float | None  # delta-method standard error of `ratio` over paired samples
    rel_slope: float | None  # mean over samples of d(window KL)/d(log2 L) ÷ that sample's mean window KL
    ci: tuple[float | None, float | None]  # CI_LEVEL Student-t interval of rel_slope (None with one sample)
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"] = list(self.ci)
        return d


def _matrix(per_sample: Mapping[int, Sequence[float]], lengths: Sequence[int]) -> np.ndarray:
    return np.array([list(per_sample[L]) for L in lengths], dtype=np.float64).T  # (n_samples, n_lengths)


def rel_slopes(m: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """Per-sample relative slopes (n,) from window KL m (n, k) at `lengths` (k): each sample's least-squares
    slope against log2(length) divided by that sample's mean over the lengths."""
    x = np.log2(np.asarray(lengths, dtype=np.float64))
    xc = x - x.mean()
    return (m * xc).sum(-1) / (xc**2).sum() / m.mean(-1)


def _ratio_se(first: np.ndarray, last: np.ndarray) -> float:
    """Delta-method SE of mean(last)/mean(first) over paired samples; 0 with one sample."""
    n = first.shape[0]
    if n < 2:
        return 0.0
    r = last.mean() / first.mean()
    return float(np.std(last - r * first, ddof=1) / (np.sqrt(n) * first.mean()))


def growth(per_sample: Mapping[int, Sequence[float]], lengths: Sequence[int], floor: float = 0.0) -> Growth:
    """Growth statistics from per-sample window KL at each length; undefined (None, 'n/a') when the mean at
    the shortest length is not above gate.GROWTH_MIN_FLOORS × `floor` (0/0, or a ratio of float noise), or
    when some sample's mean KL is not positive (its relative slope is undefined)."""

    lengths = sorted(lengths)
    m = _matrix(per_sample, lengths)  # (n, k)
    if growth_ratio(m[:, 0].tolist(), m[:, -1].tolist(), floor) is None:
        return Growth(None, None, None, (None, None), "n/a")
    mean = m.mean(0)  # (k,)
    ratio = float(mean[-1] / mean[0])
    se = _ratio_se(m[:, 0], m[:, -1])
    if len(lengths) < 2 or not (m.mean(1) > 0).all():  # one length: no slope
        return Growth(ratio, se, None, (None, None), "n/a")
    rel, lo, hi = t_interval(rel_slopes(m, lengths).tolist(), CI_LEVEL)
    if m.shape[0] < 2:  # one sample: no interval
        return Growth(ratio, se, rel, (None, None), "inconclusive")
    return Growth(ratio, se, rel, (lo, hi), verdict(lo, hi))


def verdict(lo: float, hi: float) -> str:
    """'rising', 'falling', 'flat' or 'inconclusive' from the CI of the relative slope (NaN → inconclusive)."""
    if lo > RISING:
        return "rising"
    if hi < -RISING:
        return "falling"
    if lo > -FLAT and hi < FLAT:
        return "flat"
    return "inconclusive"


def log_slopes(m: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """Per-sample log-log slopes (n,) from KL m (n, k) at `lengths` (k): each sample's least-squares slope of
    log2 KL against log2(length), the exponent b of KL ∝ L^b (KL multiplies by 2^b per doubling). Every value of
    m must be > 0."""
    x = np.log2(np.asarray(lengths, dtype=np.float64))
    xc = x - x.mean()
    return (np.log2(m) * xc).sum(-1) / (xc**2).sum()


@dataclass(frozen=True)
class MatchedGrowth:
    """Growth of the matched-target curves (the same target tokens at every length): per sample the log-log slope
    of KL_i(L) against L (`log_slopes`), their mean with a CI_LEVEL Student-t interval over samples (df = n − 1),
    and the ratio of mean KL at the longest length to the shortest. Informational: no verdict, no gate; None
    (reason in `na`) when some KL_i(L) is not above `min_kl` (log undefined or float noise) or with one length."""

    slope: float | None  # mean per-sample exponent b (KL ∝ L^b)
    ci: tuple[float | None, float | None]
    per_sample: list[float]
    per_doubling: float | None  # 2^slope: the factor by which KL grows per doubling of context
    ratio: float | None  # mean KL at the longest length ÷ at the shortest
    n: int
    na: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"] = list(self.ci)
        return d


def matched_growth(
    per_sample: Mapping[int, Sequence[float]], lengths: Sequence[int], min_kl: float = 0.0
) -> MatchedGrowth:
    """MatchedGrowth from per-sample matched KL at each length; `min_kl` the smallest KL whose log means
    something (the run's floor × gate.GROWTH_MIN_FLOORS)."""
    lengths = sorted(lengths)
    m = _matrix(per_sample, lengths)  # (n, k)
    n = m.shape[0]
    ratio = float(m[:, -1].mean() / m[:, 0].mean()) if m[:, 0].mean() > min_kl else None
    if len(lengths) < 2:
        return MatchedGrowth(None, (None, None), [], None, ratio, n, "one length: no slope")
    if not (np.isfinite(m).all() and (m > min_kl).all()):
        return MatchedGrowth(None, (None, None), [], None, ratio, n, f"some KL_i(L) ≤ {min_kl:.3g} nats")
    b = log_slopes(m, lengths).tolist()
    mean, lo, hi = t_interval(b, CI_LEVEL)
    ci = (None, None) if n < 2 else (lo, hi)
    return MatchedGrowth(mean, ci, b, float(2.0**mean), ratio, n)


def log_slope_contrast(
    a: Mapping[int, Sequence[float]], b: Mapping[int, Sequence[float]], lengths: Sequence[int]
) -> Contrast:
    """Paired contrast of two methods' matched growth on the same samples and targets: per sample the log-log
    slope of a minus that of b (stats.paired_contrast: mean, CI_LEVEL t-interval, MDD at 80 % power)."""
    lengths = sorted(lengths)
    la, lb = (log_slopes(_matrix(c, lengths), lengths).tolist() for c in (a, b))
    return paired_contrast(la, lb, CI_LEVEL, 0.80)
