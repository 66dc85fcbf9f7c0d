"""Growth statistics and the paper's findings as verdicts.

Growth of a method = per sample, the slope of its window KL against log2(length) divided by its own mean window KL
("relative slope": the fraction of its own level by which KL rises per doubling of context), averaged over samples.
Its 90 % confidence interval is Student's t over the per-sample values (df = n − 1; stats.t_interval): the samples
are disjoint spans drawn from the corpus, treated as independent, and the interval covers the mean relative slope
over such spans. (The percentile bootstrap used before covered only ~74 % at n = 4; the t-interval's coverage is
checked by simulation in tests/test_findings.py and stated in the README.) Verdicts:
  rising        — CI lower bound > RISING (KL grows by more than 5 % of its mean per doubling, confidently);
  flat          — CI inside (−FLAT, +FLAT) and not rising (|growth| < 10 % of the mean per doubling);
  inconclusive  — anything else (too noisy, or falling).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .stats import Contrast, fieller_ratio, paired_contrast, t_interval

RISING = 0.05
FLAT = 0.10
CI_LEVEL = 0.90
N_BOOT = 2000  # resamples of the plot's band (plot.mean_band); the findings use t-intervals


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
    from .gate import growth_ratio

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
    """'rising', 'flat' or 'inconclusive' from the CI of the relative slope (NaN → inconclusive)."""
    if lo > RISING:
        return "rising"
    if lo > -FLAT and hi < FLAT:
        return "flat"
    return "inconclusive"


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Relative difference mean(a)/mean(b) − 1 and its CI_LEVEL interval, paired over samples (Fieller's
    interval for the ratio of means, t with df = n − 1; ±inf when mean(b) is not clearly above 0)."""
    ratio, lo, hi = fieller_ratio(a, b, CI_LEVEL)
    return ratio - 1, lo - 1, hi - 1


def slope_contrast(
    a: Mapping[int, Sequence[float]], b: Mapping[int, Sequence[float]], lengths: Sequence[int]
) -> Contrast:
    """Paired contrast of two methods' growth on the same samples: per sample, the relative slope of a minus
    that of b (per-length window KL per sample, as for `growth`); mean, CI_LEVEL t-interval and the minimum
    detectable difference at 80 % power for this n and the observed SD (stats.paired_contrast)."""
    lengths = sorted(lengths)
    ra, rb = (rel_slopes(_matrix(c, lengths), lengths).tolist() for c in (a, b))
    return paired_contrast(ra, rb, CI_LEVEL, 0.80)


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
    `judge(roles, curves, lengths, growth)` returns (holds, paper, measured, detail)."""

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
    if x.rel_slope is None or None in x.ci:
        slope = "n/a" if x.rel_slope is None else f"{x.rel_slope:+.3f}/doubling"
        return f"{method}: {x.verdict} (rel. slope {slope}, no CI with one sample, growth ×{x.ratio:.3g})"
    return (
        f"{method}: {x.verdict} (rel. slope {x.rel_slope:+.3f}/doubling, 90 % CI "
        f"[{x.ci[0]:+.3f}, {x.ci[1]:+.3f}], growth ×{x.ratio:.3g})"
    )


def _rises(v: str) -> str:
    return "yes" if v == "rising" else "no" if v == "flat" else "inconclusive"


@claim(
    "pruning-flat", "Pruning (magnitude, Wanda) stays roughly flat as context grows", ("magnitude", "wanda")
)
def _pruning_flat(roles, curves, lengths, g):
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
def _lowbit_rises(roles, curves, lengths, g):
    measured = f"{roles['rtn3']}: {g['rtn3'].verdict}; {roles['rtn4']}: {g['rtn4'].verdict}"
    detail = f"{_desc(roles['rtn3'], g['rtn3'])}; {_desc(roles['rtn4'], g['rtn4'])}"
    return _rises(g["rtn3"].verdict), "rising", measured, detail


@claim(
    "remedy-mitigates",
    "Keeping ~2 % of groups (largest magnitude) at 8 bits lowers long-context KL "
    "and its growth vs plain 3-bit, and beats random selection at equal budget",
    ("rtn3", "mixed3", "mixed3_random"),
)
def _remedy_mitigates(roles, curves, lengths, g):
    Lmax = max(lengths)
    w_m, w_r, w_c = (curves[roles[r]][Lmax] for r in ("mixed3", "rtn3", "mixed3_random"))
    kl = paired_difference(w_m, w_r)
    ctrl = paired_difference(w_m, w_c)
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
def _random_prune_rises(roles, curves, lengths, g):
    v = g["random10"].verdict
    return _rises(v), "rising", f"{roles['random10']}: {v}", _desc(roles["random10"], g["random10"])


def evaluate_claim(
    name: str,
    roles: Mapping[str, str],
    curves: Mapping[str, Mapping[int, Sequence[float]]],
    lengths: Sequence[int],
) -> dict[str, Any]:
    """One finding as a dict (Finding.to_dict). curves: method id → {length: per-sample window KL}; every
    method of the claim's roles must be present."""
    c = CLAIMS[name]
    lengths = sorted(lengths)
    g = {r: growth(curves[roles[r]], lengths) for r in c.roles}
    holds, paper, measured, detail = c.judge(roles, curves, lengths, g)
    return Finding(name, c.title, paper, measured, holds, detail, [roles[r] for r in c.roles]).to_dict()


# ---- paired contrasts of growth (informational) ---------------------------------------------------------------
# (a role, b role, the question a > 0 answers): the paper's claims are comparative; these put each comparison on the
# same samples. Not stored, not gated: the report shows them beside the verdicts.
CONTRASTS: tuple[tuple[str, str, str], ...] = (
    ("rtn3", "magnitude", "does 3-bit quantization's KL rise faster than magnitude pruning's?"),
    ("rtn3", "wanda", "does 3-bit quantization's KL rise faster than Wanda pruning's?"),
    ("rtn3", "rtn4", "does 3-bit rise faster than 4-bit?"),
    ("rtn3", "mixed3", "does keeping 2 % of groups at 8 bits slow the rise of 3-bit KL?"),
)


def growth_contrasts(
    roles: Mapping[str, str], curves: Mapping[str, Mapping[int, Sequence[float]]], lengths: Sequence[int]
) -> list[dict[str, Any]]:
    """Paired contrasts (`slope_contrast`) of relative growth for CONTRASTS whose two methods both have complete
    per-sample window KL in `curves` (method id → {length: values}); each with its reading: 'a rises faster' when
    the CI is above 0, 'b rises faster' below, else 'no difference detected (|Δ| < MDD …)'."""
    out: list[dict[str, Any]] = []
    lengths = sorted(lengths)
    if len(lengths) < 2:
        return out
    for ra, rb, question in CONTRASTS:
        a, b = roles.get(ra), roles.get(rb)
        if a not in curves or b not in curves or any(L not in curves[m] for m in (a, b) for L in lengths):
            continue
        try:
            c = slope_contrast(curves[a], curves[b], lengths)
        except (ValueError, ZeroDivisionError, FloatingPointError):
            continue
        if c.n < 2 or not all(np.isfinite([c.mean, c.lo, c.hi])):
            continue
        if c.lo > 0:
            reading = f"{a} rises faster"
        elif c.hi < 0:
            reading = f"{b} rises faster"
        else:
            reading = f"no difference detected (smallest detectable: {c.mdd:.3f}/doubling)"
        out.append({"a": a, "b": b, "question": question, "reading": reading, **c.to_dict()})
    return out
