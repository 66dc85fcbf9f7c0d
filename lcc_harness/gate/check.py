"""The regression gate: one rule for every KL case and every growth case.

A stored baseline holds, per method and length, the window KL of each evaluation sample. Samples are pinned
(seed, corpus hash, span provenance), so a rerun of an unchanged method reproduces every value up to float
noise; the spread *between* samples is not what a rerun sees and plays no part here. A case compares the new
mean over samples with the stored mean, one-sided:

    fail    when  new − baseline >  tol
    better  when  new − baseline < −tol            (reported with the update hint; never fails)
    changed when  |new − baseline| > noise_band    (beyond float noise, inside the tolerance)
    pass    otherwise

    tol        = max(ε · baseline, floor, K_NOISE · noise)
    noise_band = max(floor, K_NOISE · noise)

ε is policy (default 2 %, `--lcc-tolerance`, per-method globs in ini); `floor` is an absolute KL below which
differences are float noise (derived per baseline from the reference model against itself, see
`floor_from_self_noise`); `noise` is the cross-run float noise of that method measured when the baseline was
written (separate passes of both models). Growth (mean window KL at the longest length ÷ at the shortest) is
checked by the same rule with its own ε and no floor; it is undefined (`n/a`, never NaN) when the KL at the
shortest length is within GROWTH_MIN_FLOORS floors of zero.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lcc_harness.measure.growth import (  # the floors' constants and the growth ratio, with the curves
    FLOOR_MIN,
)

DEFAULT_EPS = 0.02
DEFAULT_GROWTH_EPS = 0.02
K_NOISE = 5.0
# Floor = max(FLOOR_MIN[dtype], K_FLOOR × self-noise), where self-noise is the window KL of the reference
# against itself in separate passes (short passes vs the prefix of the long one), measured when a baseline is
# written. On SmolLM2-135M, 4 samples at 256 tokens, this 2-core CPU (README, "The gate"): bfloat16 0.51–1.02e-3
# nats per sample; float32 exactly 0 (bit-identical). FLOOR_MIN: bfloat16 1e-3 (the measurement); float16 2e-4
# (3 more mantissa bits); float32 1e-6, far below any method's KL yet above float32 rounding (the bf16 value
# scaled by the 2^16 finer mantissa is ~2e-8), so a rerun on other hardware cannot fail on it.
K_FLOOR = 2.0


def floor_from_self_noise(self_noise: float, dtype: str) -> float:
    """The absolute KL floor for a baseline measured in `dtype` whose reference-vs-itself KL is `self_noise`."""
    return max(FLOOR_MIN.get(dtype, max(FLOOR_MIN.values())), K_FLOOR * abs(self_noise))


def check_eps(eps: float, what: str) -> float:
    """ε as a float in [0, 1); anything else is a ValueError naming `what`."""
    try:
        v = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"{what} '{eps}' is not a number; pass a fraction such as 0.02 (2 %)") from None
    if not (math.isfinite(v) and 0 <= v < 1):
        raise ValueError(f"{what} {eps} must be a fraction in [0, 1), e.g. 0.02 for 2 %")
    return v


@dataclass(frozen=True)
class Policy:
    """Relative tolerances: `eps` for window KL, `growth_eps` for growth; `per_method` / `per_method_growth`
    are (glob, ε) pairs where the first glob matching a method id wins."""

    eps: float = DEFAULT_EPS
    growth_eps: float = DEFAULT_GROWTH_EPS
    per_method: tuple[tuple[str, float], ...] = ()
    per_method_growth: tuple[tuple[str, float], ...] = ()

    def for_method(self, method: str, kind: str) -> float:
        pairs, default = (
            (self.per_method_growth, self.growth_eps) if kind == "growth" else (self.per_method, self.eps)
        )
        return next((e for g, e in pairs if fnmatch.fnmatchcase(method, g)), default)


def parse_method_eps(lines: Sequence[str], what: str) -> tuple[tuple[str, float], ...]:
    """Ini lines 'GLOB = EPS' → ((glob, ε), …); a malformed line is a ValueError naming it."""
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        glob, sep, eps = line.partition("=")
        if not sep or not glob.strip():
            raise ValueError(f"{what} line '{line}' is not 'GLOB = EPS'; write e.g. 'rtn-* = 0.05'")
        out.append((glob.strip(), check_eps(eps.strip(), f"{what} for '{glob.strip()}'")))
    return tuple(out)


@dataclass(frozen=True)
class Paired:
    """Per-sample change against the baseline (samples are paired: the same spans in both runs).
    worse/better: samples that moved beyond the noise band; rel: per-sample relative changes."""

    n: int
    worse: int
    better: int
    mean_rel: float | None
    min_rel: float | None
    max_rel: float | None

    def describe(self) -> str:
        if self.mean_rel is None:
            return f"{self.worse}/{self.n} worse"
        return (
            f"{self.worse}/{self.n} worse, {self.better}/{self.n} better; per sample "
            f"{self.min_rel:+.1%}…{self.max_rel:+.1%}"
        )


def paired(new: Sequence[float], old: Sequence[float], band: float) -> Paired:
    """Paired per-sample comparison; `band` is the absolute noise band (a sample beyond it counts)."""
    d = [a - b for a, b in zip(new, old, strict=True)]
    rel = [a / b - 1 for a, b in zip(new, old, strict=True) if b > 0]
    return Paired(
        n=len(d),
        worse=sum(x > band for x in d),
        better=sum(x < -band for x in d),
        mean_rel=sum(rel) / len(rel) if rel else None,
        min_rel=min(rel) if rel else None,
        max_rel=max(rel) if rel else None,
    )


@dataclass(frozen=True)
class Check:
    """Outcome of one one-sided comparison (see the module docstring for the rule)."""

    outcome: str
    value: float | None
    baseline: float | None
    tolerance: float | None
    band: float | None = None
    paired: Paired | None = None
    note: str = ""

    @property
    def message(self) -> str:
        if self.outcome == "n/a":
            return self.note or "not defined"
        if self.value is None:
            return self.note or "no value"
        if self.baseline is None or self.tolerance is None:
            return f"{self.value:.6g} (no baseline)"
        rel = (
            f"{self.value / self.baseline - 1:+.2%}"
            if self.baseline
            else f"{self.value - self.baseline:+.3g}"
        )
        text = (
            f"{self.value:.6g} vs baseline {self.baseline:.6g} ({rel}; tolerance ±{self.tolerance:.3g} → "
            f"limit {self.baseline + self.tolerance:.6g})"
        )
        if self.paired is not None:
            text += f"; {self.paired.describe()}"
        return text

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["message"] = self.message
        return d


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def compare(value: float, baseline: float, tol: float, band: float, pair: Paired | None = None) -> Check:
    """The rule on one number; NaN/Inf values always fail."""
    if not math.isfinite(value):
        return Check("fail", value, baseline, tol, band, pair, "non-finite value")
    d = value - baseline
    if d > tol:
        outcome = "fail"
    elif d < -tol:
        outcome = "better"
    elif abs(d) > band:
        outcome = "changed"
    else:
        outcome = "pass"
    return Check(outcome, value, baseline, tol, band, pair)


def check_kl(new: Sequence[float], old: Sequence[float], eps: float, floor: float, rel_noise: float) -> Check:
    """Window KL at one length: `new` and `old` are per-sample values over the same (paired) samples."""
    base, value = _mean(old), _mean(new)
    noise = rel_noise * abs(base)
    band = max(floor, K_NOISE * noise)
    tol = max(eps * abs(base), band)
    return compare(value, base, tol, band, paired(new, old, band))


def check_growth(new: float | None, old: float | None, eps: float, rel_noise: float) -> Check:
    """Growth ratio; n/a when either is undefined. The ratio's noise is taken as twice the relative noise."""
    if new is None or old is None:
        which = "this run" if new is None else "the baseline"
        return Check(
            "n/a", new, old, None, note=f"growth undefined in {which}: KL at the shortest length is ~0"
        )
    band = K_NOISE * 2 * rel_noise * abs(old)
    tol = max(eps * abs(old), band)
    return compare(new, old, tol, band)


@dataclass(frozen=True)
class ClaimCheck:
    """A claim's verdict against the stored one: outcome 'pass', 'changed' (the verdict differs), 'missing' (no
    stored verdict), 'basis' (stored on other target tokens: not compared) or 'informative' (never fails)."""

    outcome: str
    stored: str | None
    then: Mapping[str, Any] | None = None

    @property
    def fails(self) -> bool:
        return self.outcome in ("changed", "missing", "basis")


def check_claim(finding: dict[str, Any], baseline: Any, basis: Mapping[str, Any]) -> ClaimCheck:
    """The one rule for a claim's verdict, in the pytest session and in `lcc merge`: `finding` (a Finding dict)
    against `baseline` (a BaselineFile, or None when there is none or it is being rewritten), judged on `basis`
    (baselines.findings_basis of this run). Sets finding['stored'] and finding['reproduced']."""
    stored = None if baseline is None else baseline.findings.get(finding["claim"])
    then = None if baseline is None else baseline.findings_basis
    informative = bool(finding.get("informative"))
    if not informative and then is not None and then != basis:
        finding["stored"], finding["reproduced"] = None, None
        return ClaimCheck("basis", stored, then)
    finding["stored"] = stored
    finding["reproduced"] = None if stored is None else stored == finding["holds"]
    if informative:
        return ClaimCheck("informative", stored, then)
    if stored is None:
        return ClaimCheck("missing", None, then)
    return ClaimCheck("pass" if finding["reproduced"] else "changed", stored, then)
