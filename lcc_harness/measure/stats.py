"""Small exact statistics the findings need, without scipy: Student's t distribution, t-intervals over samples,
a paired contrast with its minimum detectable difference, and the seeds × samples crossed mean.

Every interval here treats the evaluation samples (disjoint token spans drawn with the run's seed) as independent
draws from the corpus and covers a mean over such spans; values of one sample under two methods are paired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

_EPS = 1e-15
_TINY = 1e-300


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > _TINY else _TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > _TINY else _TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta: continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


@lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` > 0 degrees of freedom (bisection on t_cdf to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level must lie in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # bracket: the tail of t(1) at p = 1 − 1e-12 is ~3e11, reached in ~40 doublings
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _mean_sd(x: Sequence[float]) -> tuple[float, float]:
    n = len(x)
    mean = math.fsum(x) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in x) / (n - 1)) if n > 1 else math.nan
    return mean, sd


def t_interval(values: Sequence[float], level: float = 0.90) -> tuple[float, float, float]:
    """(mean, lo, hi): the two-sided `level` Student-t interval of the mean of `values` (df = n − 1); the
    bounds are NaN with fewer than 2 values."""
    x = [float(v) for v in values]
    if not x:
        raise ValueError("t_interval needs at least one value")
    mean, sd = _mean_sd(x)
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + level / 2, len(x) - 1) * sd / math.sqrt(len(x))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Estimate:
    """A mean with its `level` t-interval, the degrees of freedom behind it, n (samples; × seeds for a crossed
    mean) and the minimum detectable effect (two-sided test at 1 − level, given power)."""

    mean: float
    lo: float
    hi: float
    df: float
    n: int
    level: float
    power: float
    mdd: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def one_sample(values: Sequence[float], level: float = 0.90, power: float = 0.80) -> Estimate:
    """Mean of `values` (independent samples, ≥ 2), its Student-t `level` interval (df = n − 1) and the smallest
    true mean a two-sided t-test of 'mean = 0' at α = 1 − level detects with probability `power` at this n and the
    observed SD: MDD = (t_{1−α/2} + t_{power}) · sd/√n, both quantiles of df = n − 1 (the usual approximation of
    the noncentral t; slightly optimistic for tiny n)."""
    x = [float(v) for v in values]
    if len(x) < 2:
        raise ValueError(f"one_sample needs at least 2 values, got {len(x)}")
    mean, lo, hi = t_interval(x, level)
    se = _mean_sd(x)[1] / math.sqrt(len(x))
    df = len(x) - 1
    mdd = (t_quantile(0.5 + level / 2, df) + t_quantile(power, df)) * se
    return Estimate(mean, lo, hi, float(df), len(x), level, power, mdd)


def crossed_mean(rows: Sequence[Sequence[float]], level: float = 0.90, power: float = 0.80) -> Estimate:
    """Grand mean of a seeds × samples table (S ≥ 2 rows, n ≥ 2 columns; every seed measured on the same samples)
    with both factors random: y_is = μ + a_s + b_i + e_is. Its variance is σ_a²/S + σ_b²/n + σ_e²/(S·n), estimated
    without bias by (MS_seed + MS_sample − MS_resid)/(S·n) from the two-way ANOVA (floored at the larger of
    MS_seed, MS_sample over S·n, each of which alone misses one component); degrees of freedom by Satterthwaite.
    Averaging over seeds alone (df = S − 1) would ignore that every seed shares the same samples, and averaging
    over samples alone would ignore the seed-to-seed spread; this covers both (coverage checked by simulation in
    tests/test_findings.py)."""
    y = [[float(v) for v in r] for r in rows]
    s, n = len(y), len(y[0]) if y else 0
    if s < 2 or n < 2 or any(len(r) != n for r in y):
        raise ValueError(
            f"crossed_mean needs a full table of >= 2 seeds x >= 2 samples, got {[len(r) for r in y]}"
        )
    grand = math.fsum(v for r in y for v in r) / (s * n)
    row_m = [math.fsum(r) / n for r in y]
    col_m = [math.fsum(y[k][i] for k in range(s)) / s for i in range(n)]
    ms_seed = n * math.fsum((m - grand) ** 2 for m in row_m) / (s - 1)
    ms_samp = s * math.fsum((m - grand) ** 2 for m in col_m) / (n - 1)
    ms_res = math.fsum((y[k][i] - row_m[k] - col_m[i] + grand) ** 2 for k in range(s) for i in range(n)) / (
        (s - 1) * (n - 1)
    )
    parts = [(ms_seed, s - 1), (ms_samp, n - 1), (-ms_res, (s - 1) * (n - 1))]
    v = sum(c for c, _ in parts)
    if v < max(ms_seed, ms_samp):  # the unbiased combination went below what one component alone shows
        v = max(ms_seed, ms_samp)
        df = float(s - 1 if ms_seed >= ms_samp else n - 1)
    else:
        den = math.fsum(c * c / d for c, d in parts)
        df = v * v / den if den > 0 else float((s - 1) * (n - 1))
    se = math.sqrt(v / (s * n))
    tq = t_quantile(0.5 + level / 2, df)
    mdd = (tq + t_quantile(power, df)) * se
    return Estimate(grand, grand - tq * se, grand + tq * se, df, s * n, level, power, mdd)


@dataclass(frozen=True)
class Contrast(Estimate):
    """A paired contrast a − b over samples: an Estimate of the mean per-sample difference, plus the SD of the
    differences."""

    sd: float


def paired_contrast(
    a: Sequence[float], b: Sequence[float], level: float = 0.90, power: float = 0.80
) -> Contrast:
    """Per-sample differences a_i − b_i (e.g. two methods' slopes on the same spans): their mean, its Student-t
    `level` interval and MDD (`one_sample`), and their SD."""
    av, bv = [float(v) for v in a], [float(v) for v in b]
    if len(av) != len(bv) or len(av) < 2:
        raise ValueError(
            f"paired_contrast needs two paired samples of length >= 2, got {len(av)} and {len(bv)}"
        )
    d = [x - y for x, y in zip(av, bv, strict=True)]
    return Contrast(**asdict(one_sample(d, level, power)), sd=_mean_sd(d)[1])
