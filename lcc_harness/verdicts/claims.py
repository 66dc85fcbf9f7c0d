"""Growth statistics and the paper's claims as verdicts.

Two kinds of growth live here:
- per method, on the window curves (`growth`): per sample, the slope of window KL against log2(length) divided by
  that sample's mean window KL, averaged over samples, with a Student-t 90 % interval (df = n − 1). Stored in the
  baseline beside each method and shown in the report. Its verdict uses the claims' directional rule on that
  interval: 'rising' (the 90 % interval lies wholly above 0), 'falling' (wholly below 0), else 'flat' when it lies
  inside ±FLAT (KL changes by less than 2 % of its level per doubling: the margin), else 'inconclusive'. It describes
  that method alone and judges no claim. (Until this rule, 'rising' needed a lower bound above +5 % and 'flat' an
  interval inside ±10 %, so a seed rising 8 %/doubling read 'flat' beside a claim that random pruning rises.)
- per claim, on the matched-target curves (the same target tokens at every length): paired per-sample contrasts
  of the log-log growth exponent and of the KL level (see "the paper's claims as paired contrasts" below). These
  are the verdicts the baseline stores and `pytest suites/` re-checks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lcc_harness.measure.growth import CI_LEVEL, _matrix, log_slope_contrast, log_slopes
from lcc_harness.measure.stats import (
    Estimate,
    crossed_mean,
    one_sample,
)


@dataclass(frozen=True)
class Part:
    """One tested statement of a claim: what is estimated (`quantity`, in `unit`), the estimate, its CI_LEVEL
    interval, the MDD at 80 % power, n, df, the claimed direction ('>' or '<' 0) and the verdict. `judged` False:
    reported beside the claim, not part of its verdict. `na` says why the part could not be estimated."""

    statement: str
    quantity: str
    unit: str
    estimate: float | None
    lo: float | None
    hi: float | None
    mdd: float | None
    n: int
    df: float | None
    direction: str
    verdict: str
    judged: bool = True
    na: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _side(lo: float, hi: float, direction: str) -> str:
    """'yes' when the interval lies wholly on the claimed side of 0, 'no' on the other, else 'inconclusive'."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "inconclusive"
    above, below = lo > 0, hi < 0
    if direction == ">":
        return "yes" if above else "no" if below else "inconclusive"
    return "yes" if below else "no" if above else "inconclusive"


def _part(
    statement: str,
    quantity: str,
    unit: str,
    est: Estimate,
    direction: str,
    judged: bool = True,
    transform: Callable[[float], float] | None = None,
) -> Part:
    f = transform or (lambda v: v)  # a monotone map of the estimate's scale (log ratio → ratio − 1)
    return Part(
        statement,
        quantity,
        unit,
        f(est.mean),
        f(est.lo),
        f(est.hi),
        f(est.mdd),
        est.n,
        est.df,
        direction,
        _side(est.lo, est.hi, direction),
        judged,
    )


def _na(statement: str, quantity: str, unit: str, direction: str, why: str, judged: bool = True) -> Part:
    return Part(statement, quantity, unit, None, None, None, None, 0, None, direction, "n/a", judged, why)


def _positive(
    curves: Mapping[str, Mapping[int, Sequence[float]]], mid: str, lengths: Sequence[int]
) -> np.ndarray:
    """The (n, k) per-sample KL of `mid`; ValueError naming the method when a value is not > 0 (its log, which
    every part takes, would be undefined)."""
    m = _matrix(curves[mid], lengths)
    if not (np.isfinite(m).all() and (m > 0).all()):
        raise ValueError(f"{mid} has a per-sample KL that is not > 0 (log undefined)")
    return m


def _slope_part(curves, lengths, mid: str, direction: str = ">", judged: bool = True) -> Part:
    st = f"growth exponent of {mid} {direction} 0"
    try:
        b = log_slopes(_positive(curves, mid, lengths), lengths)
        return _part(st, f"b({mid})", "exponent", one_sample(b.tolist(), CI_LEVEL), direction, judged)
    except ValueError as exc:
        return _na(st, f"b({mid})", "exponent", direction, str(exc), judged)


def _slope_contrast_part(curves, lengths, a: str, b: str, direction: str) -> Part:
    st = f"growth exponent of {a} {direction} that of {b}"
    try:
        for m in (a, b):
            _positive(curves, m, lengths)  # raises naming the method with a KL ≤ 0
        est = log_slope_contrast(curves[a], curves[b], lengths)
        return _part(st, f"b({a}) − b({b})", "exponent", est, direction)
    except ValueError as exc:
        return _na(st, f"b({a}) − b({b})", "exponent", direction, str(exc))


def _level_part(curves, lengths, a: str, b: str, L: int) -> Part:
    """KL of a below KL of b at length L: per sample log(KL_a / KL_b), paired; shown as a ratio − 1 (geometric
    mean over samples), so −0.10 reads '10 % lower'."""
    st = f"KL of {a} < KL of {b} at {L}"
    q = f"KL({a}) / KL({b}) − 1 at {L}"
    try:
        la, lb = (_positive(curves, m, [L])[:, 0] for m in (a, b))
        est = one_sample(np.log(la / lb).tolist(), CI_LEVEL)
        return _part(st, q, "relative", est, "<", transform=lambda v: float(np.expm1(v)))
    except ValueError as exc:
        return _na(st, q, "relative", "<", str(exc))


def _random_slope_part(curves, lengths, mids: Sequence[str]) -> Part:
    st = f"growth exponent of random pruning > 0 over {len(mids)} mask seeds"
    q = f"mean b over {len(mids)} seeds ({_seed_span(mids)})"
    if len(mids) < 2:
        return _slope_part(curves, lengths, mids[0]) if mids else _na(st, q, "exponent", ">", "no seeds")
    try:
        rows = [log_slopes(_positive(curves, m, lengths), lengths).tolist() for m in mids]
        return _part(st, q, "exponent", crossed_mean(rows, CI_LEVEL), ">")
    except ValueError as exc:
        return _na(st, q, "exponent", ">", str(exc))


def _seed_span(mids: Sequence[str]) -> str:
    """'random-s10-seed0…4' for consecutive seed ids, else the ids joined."""
    stems = {m.rsplit("-seed", 1)[0] for m in mids}
    if len(stems) == 1 and all("-seed" in m for m in mids):
        seeds = [m.rsplit("-seed", 1)[1] for m in mids]
        return f"{next(iter(stems))}-seed{seeds[0]}…{seeds[-1]}"
    return ", ".join(mids)


def combine(parts: Sequence[Part]) -> str:
    """'yes' when every judged part is yes, 'no' when any is no, else 'inconclusive'."""
    v = [p.verdict for p in parts if p.judged]
    if v and all(x == "yes" for x in v):
        return "yes"
    if any(x == "no" for x in v):
        return "no"
    return "inconclusive"


@dataclass(frozen=True)
class Finding:
    """One claim evaluated on one run: `holds` is yes / no / inconclusive; `parts` the tested statements, judged
    on matched-target curves of `target_tokens` target tokens."""

    claim: str
    title: str
    paper: str
    measured: str
    holds: str
    detail: str
    methods: list[str]
    parts: list[dict[str, Any]]
    target_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Claim:
    """A claim of the paper: the roles (profile method slots) it compares and how it is judged.
    `judge(ids, curves, lengths)` → (paper, parts): ids maps each role to its method ids (a tuple: one id, or one
    per mask seed)."""

    name: str
    title: str
    roles: tuple[str, ...]
    judge: Callable[..., tuple[str, list[Part]]]
    # what the judge reads per method: 'matched' (per-sample matched-target KL per length) or 'copy-ratio'
    # (`copy_ratio`: per-sample log(copy KL / window KL) per length, from the copy probe)
    data: str = "matched"
    # informative: evaluated and reported (and its verdict stored), but a changed verdict fails no test
    informative: bool = False


CLAIMS: dict[str, Claim] = {}


def claim(
    name: str, title: str, roles: tuple[str, ...], data: str = "matched", informative: bool = False
) -> Callable:
    """Decorator registering a claim's judge under `name` (a duplicate name is a ValueError)."""

    def deco(fn: Callable[..., tuple[str, list[Part]]]) -> Callable:
        if name in CLAIMS:
            raise ValueError(f"claim '{name}' is registered twice")
        CLAIMS[name] = Claim(name, title, roles, fn, data, informative)
        return fn

    return deco


def role_ids(roles: Mapping[str, str | Sequence[str]], role: str) -> tuple[str, ...]:
    """The method ids of one role: a profile maps a role to one id, or to several (one per mask seed)."""
    v = roles[role]
    return (v,) if isinstance(v, str) else tuple(v)


def missing_roles(name: str, roles: Mapping[str, str | Sequence[str]]) -> list[str]:
    """The roles of claim `name` that a profile does not define (e.g. the sliding-window claim on a model
    without sliding-window layers): the claim is not evaluated on that profile."""
    return [r for r in CLAIMS[name].roles if r not in roles]


def claim_methods(name: str, roles: Mapping[str, str | Sequence[str]]) -> list[str]:
    """Every method id the claim `name` reads, in role order."""
    return [m for r in CLAIMS[name].roles for m in role_ids(roles, r)]


@claim(
    "quant-rises-more-than-pruning",
    "3-bit quantization's KL rises faster with context than magnitude's and Wanda's (same targets, paired)",
    ("rtn3", "magnitude", "wanda"),
)
def _quant_vs_pruning(ids, curves, lengths):
    q = ids["rtn3"][0]
    parts = [_slope_contrast_part(curves, lengths, q, ids[r][0], ">") for r in ("magnitude", "wanda")]
    return "quantization rises, pruning stays flat", parts


@claim(
    "lowbit-rises",
    "Low-bit weight quantization's KL rises with context, 3-bit more than 4-bit (4-bit reported)",
    ("rtn3", "rtn4"),
)
def _lowbit_rises(ids, curves, lengths):
    q3, q4 = ids["rtn3"][0], ids["rtn4"][0]
    parts = [
        _slope_part(curves, lengths, q3),
        _slope_contrast_part(curves, lengths, q3, q4, ">"),
        _slope_part(curves, lengths, q4, judged=False),
    ]
    return "rises, clearly at 3 bits", parts


@claim(
    "remedy-mitigates",
    "Keeping ~2 % of groups (largest magnitude) at 8 bits lowers long-context KL and its growth vs plain "
    "3-bit, and beats a random choice of groups at equal budget",
    ("rtn3", "mixed3", "mixed3_random"),
)
def _remedy_mitigates(ids, curves, lengths):
    m3, r3, c3 = ids["mixed3"][0], ids["rtn3"][0], ids["mixed3_random"][0]
    L = max(lengths)
    parts = [
        _level_part(curves, lengths, m3, r3, L),
        _slope_contrast_part(curves, lengths, m3, r3, "<"),
        _level_part(curves, lengths, m3, c3, L),
    ]
    return "lower KL at long context, lower growth, better than random groups", parts


@claim(
    "random-prune-rises",
    "Randomly pruning 10 % of weights gives a KL that rises with context (over several mask seeds)",
    ("random10",),
)
def _random_prune_rises(ids, curves, lengths):
    return "rises almost linearly", [_random_slope_part(curves, lengths, ids["random10"])]


@claim(
    "lowbit-copy-more-than-pruning",
    "3-bit quantization degrades copying at a distance more than magnitude and Wanda pruning do, relative to each "
    "method's own window KL (copy probe; informative)",
    ("rtn3", "magnitude", "wanda"),
    data="copy-ratio",
    informative=True,
)
def _lowbit_copy(ids, curves, lengths):
    q = ids["rtn3"][0]
    return "not in the paper: a probe of its explanation (noise in keys and values hurts retrieval)", [
        _copy_part(curves, q, ids[r][0]) for r in ("magnitude", "wanda")
    ]


@claim(
    "sliding-window-grows-less",
    "KV-cache noise confined to the sliding-window layers grows less with context than the same noise in the "
    "full-attention layers (models with both; same targets, paired)",
    ("kv_swa", "kv_full"),
)
def _sliding_window(ids, curves, lengths):
    s, f = ids["kv_swa"][0], ids["kv_full"][0]
    parts = [
        _slope_contrast_part(curves, lengths, s, f, "<"),
        _slope_part(curves, lengths, s, judged=False),
        _slope_part(curves, lengths, f, judged=False),
    ]
    return (
        "not in the paper: its explanation predicts it (a sliding layer attends to at most W noisy tokens)",
        parts,
    )


def copy_ratio(
    probes: Mapping[str, Any] | None, window: Mapping[int, Sequence[float]], lengths: Sequence[int]
) -> dict[int, list[float]]:
    """Per length where the copy probe is defined for every sample: per sample log(copy KL / window KL) — how much
    more a method hurts copying than it hurts the average token (comparable across methods of different damage).
    Empty when the run has no copy probe."""
    out: dict[int, list[float]] = {}
    for L in lengths:
        cell = ((probes or {}).get("curves") or {}).get(str(L), {}).get("copy") or {}
        per, win = cell.get("per_sample"), window.get(L)
        if (
            not per
            or not win
            or len(per) != len(win)
            or not all(a > 0 and b > 0 for a, b in zip(per, win, strict=True))
        ):
            continue
        out[L] = [float(np.log(a / b)) for a, b in zip(per, win, strict=True)]
    return out


def _copy_part(curves, a: str, b: str) -> Part:
    """Per sample, the mean over the lengths both methods have of log(copy/window)_a − log(copy/window)_b; one-
    sample t-interval over the samples (paired: the same spans and probe sequences), shown as a ratio − 1."""
    st = f"copy KL / window KL of {a} > that of {b}"
    q = f"(copy/window)({a}) ÷ (copy/window)({b}) − 1"
    Ls = sorted(set(curves.get(a, {})) & set(curves.get(b, {})))
    if not Ls:
        return _na(st, q, "relative", ">", "the copy probe is n/a (or absent) at every length")
    d = np.mean([np.subtract(curves[a][L], curves[b][L]) for L in Ls], axis=0)
    if d.shape[0] < 2:
        return _na(st, q, "relative", ">", "one sample: no interval")
    est = one_sample(d.tolist(), CI_LEVEL)
    return _part(st, q, "relative", est, ">", transform=lambda v: float(np.expm1(v)))


def fmt_part_value(v: Any, unit: str | None, missing: str = "n/a") -> str:
    """One Part number as text: a signed percentage for `relative` parts, else signed to 3 decimals; `missing`
    for None or a non-finite value. Shared by the finding's one-line summary and the report's parts table."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not np.isfinite(v):
        return missing
    return f"{v:+.1%}" if unit == "relative" else f"{v:+.3f}"


def _fmt_part(p: Part) -> str:
    if p.estimate is None:
        return f"{p.quantity}: n/a ({p.na})"
    f = lambda v: fmt_part_value(v, p.unit)  # noqa: E731
    return f"{p.quantity} = {f(p.estimate)} [{f(p.lo)}, {f(p.hi)}] → {p.verdict}"


def evaluate_claim(
    name: str,
    roles: Mapping[str, str | Sequence[str]],
    curves: Mapping[str, Mapping[int, Sequence[float]]],
    lengths: Sequence[int],
    target_tokens: int | None = None,
) -> dict[str, Any]:
    """One finding as a dict (Finding.to_dict). curves: method id → {length: per-sample matched KL_i(L)} for every
    method of the claim (claim_methods), on the same samples, scored on `target_tokens` target tokens."""
    c = CLAIMS[name]
    lengths = sorted(lengths)
    ids = {r: role_ids(roles, r) for r in c.roles}
    paper, parts = c.judge(ids, curves, lengths)
    holds = combine(parts)
    measured = "; ".join(_fmt_part(p) for p in parts if p.judged)
    extra = [_fmt_part(p) for p in parts if not p.judged]
    n = max((p.n for p in parts), default=0)
    detail = (
        f"90 % t-intervals over {n} paired values; MDD (80 % power): "
        + ", ".join(f"{p.quantity} {p.mdd:.3g}" for p in parts if p.mdd is not None)
        + (f"; reported: {'; '.join(extra)}" if extra else "")
        if n
        else "not estimated"  # every part n/a
    )
    return Finding(
        name,
        c.title,
        paper,
        measured,
        holds,
        detail,
        claim_methods(name, roles),
        [p.to_dict() for p in parts],
        target_tokens,
    ).to_dict() | {"informative": c.informative}
