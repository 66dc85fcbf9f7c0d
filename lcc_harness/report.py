"""Reports of one harness run: Markdown tables, the JSON record, a KL-vs-context PNG, a terminal summary.

Input is the run RECORD the pytest plugin collects (a plain JSON-able dict, see `write_reports`); nothing
here reaches back into models or measurements. Every file is written atomically (temp file in the same
folder, then `os.replace`), so a reader sees either the previous report or a complete new one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .errors import ReportDirError, WriteError
from .files import atomic_write_many
from .findings import fmt_part_value
from .plot import render_anatomy_png, render_png
from .record import anatomy as _anatomy
from .record import bits as _bits
from .record import curves as _curves
from .record import finite as _finite
from .record import lengths as _lengths
from .record import matched as _matched
from .record import methods as _methods
from .record import outliers as _outliers
from .record import run_title as _run_title
from .record import super_weights_zeroed as _super_weights_zeroed

REPORT_MD = "kl_report.md"
REPORT_JSON = "kl_report.json"
REPORT_PNG = "kl_vs_context.png"
ANATOMY_PNG = "kl_anatomy.png"  # written only when some method has an error anatomy
PROBES_PNG = "kl_probes.png"  # written only when some method has probes
DASH = "—"

OUTCOME_MARK = {
    "pass": "✅ pass",
    "changed": "↕ changed",
    "n/a": "n/a",
    "fail": "❌ fail",
    "better": "⬇ better",
    "missing": "missing",
    "updated": "updated",
    "error": "⚠ error",
}
KIND_LABEL = {"kl": "window KL", "growth": "growth"}
HOLDS_MARK = {"yes": "✅", "no": "❌", "partly": "◐", "inconclusive": "❔", "not run": "—"}

HOW_TO_READ = (
    "All KL values are KL(P_ref ‖ P_cmp) in nats per next-token distribution, P_ref from the uncompressed "
    "model and P_cmp from the compressed copy, on the same tokens. At context length L, **window KL** is the "
    "mean over positions (L/2, L] (what a model sees late in a long context) and **cumulative KL** the mean "
    "over [0, L). p99 is the 99th percentile of per-position KL in the window, **top-1** the share of window "
    "positions where both models' most likely next token agree, and **ΔNLL** = NLL_cmp − NLL_ref of the "
    "actual next token (positive: the compressed model is worse). **Growth** = window KL at the longest "
    "length ÷ at the shortest; **rel. slope** = per sample, the slope of window KL against log2(length) ÷ that "
    "sample's mean KL (the fraction of its own level by which KL rises per doubling of context), averaged over "
    "samples, with a 90 % Student-t confidence interval over samples (df = n − 1). Checks compare the mean window KL over the same (paired) samples with the stored "
    "baseline and fail only when it got worse by more than the tolerance max(ε·baseline, floor, 5·noise); "
    "lower KL beyond it is ⬇ better, a change beyond float noise but inside the tolerance is ↕ changed, and "
    "the paired column counts the samples that got worse. Growth is n/a when KL at the shortest length is ~0. "
    "Informational, never checked against baselines (as in llama.cpp's `perplexity --kl-divergence`): "
    "**reverse KL** = KL(P_cmp ‖ P_ref) over the same window; top-1 ± its binomial standard error over the "
    "pooled window positions (it treats positions as independent, so it understates the spread between texts); "
    "**Δp** = p_cmp − p_ref of the actual next token, in percentage points (mean, RMS and percentiles over the "
    "window positions of every sample)."
)


# ---------------------------------------------------------------------------------------------- formatting


def fmt_kl(x: Any) -> str:
    """KL (or any non-negative magnitude) with 4 significant digits; e-notation below 1e-3 or from 1e4."""
    if x is None:
        return DASH
    if not _finite(x):
        return str(x) if isinstance(x, float) else DASH
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax < 1e-3 or ax >= 1e4:
        return f"{x:.3e}"
    decimals = max(0, 3 - math.floor(math.log10(ax)))
    return f"{x:.{decimals}f}"


def fmt_signed(x: Any) -> str:
    """Like `fmt_kl` but always signed (ΔNLL)."""
    if not _finite(x):
        return fmt_kl(x)
    return ("+" if x >= 0 else "-") + fmt_kl(abs(x))


def fmt_pct(x: Any) -> str:
    """A fraction in [0, 1] as a percentage with two decimals (top-1 agreement)."""
    return f"{100 * x:.2f} %" if _finite(x) else fmt_kl(x)


def fmt_pct_se(x: Any, se: Any) -> str:
    """A fraction with its standard error as percentages: '97.12 ± 0.31 %' (the value alone without an SE)."""
    return f"{100 * x:.2f} ± {100 * se:.2f} %" if _finite(x) and _finite(se) else fmt_pct(x)


def fmt_pp(x: Any) -> str:
    """A probability difference (Δp) in signed percentage points, e.g. '-0.412 %'."""
    return f"{100 * x:+.3f} %" if _finite(x) else fmt_kl(x)


def fmt_dp(key: str, x: Any) -> str:
    """A Δp statistic of DP_COLUMNS: signed percentage points, the RMS unsigned."""
    return f"{100 * x:.3f} %" if key == "dp_rms" and _finite(x) else fmt_pp(x)


# Δp columns of a curve: (key in LengthStats.to_dict, header); one list for the report and `lcc measure`
DP_COLUMNS: tuple[tuple[str, str], ...] = (
    ("dp_mean", "mean Δp"),
    ("dp_rms", "RMS Δp"),
    ("dp_p01", "1 %"),
    ("dp_p05", "5 %"),
    ("dp_p50", "median"),
    ("dp_p95", "95 %"),
    ("dp_p99", "99 %"),
)


# llama-perplexity's KL-divergence block (measure.statistics_block): (key, header) of the spread columns
SPREAD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("max", "max"),
    ("p99.9", "99.9 %"),
    ("p99", "99 %"),
    ("p95", "95 %"),
    ("p90", "90 %"),
    ("median", "median"),
    ("p10", "10 %"),
    ("p5", "5 %"),
    ("p1", "1 %"),
    ("p0.1", "0.1 %"),
    ("min", "min"),
)


def _mean_se(d: Mapping[str, Any], scale: float = 1.0, digits: int = 6) -> str:
    m, se = d.get("mean"), d.get("se")
    if not _finite(m):
        return DASH
    return f"{scale * m:.{digits}f} ± {scale * se:.{digits}f}" if _finite(se) else f"{scale * m:.{digits}f}"


def stats_block_tables(rows: Sequence[tuple[str, int, Mapping[str, Any] | None]], fmt: str = "github") -> str:
    """llama-perplexity's statistics per (label, length, LengthStats.stats): the KLD table (nats) and the Δp table
    (percentage points), with same-top-p and the PPL ratio; '' when no row has the block."""
    have = [(lab, L, s) for lab, L, s in rows if s]
    if not have:
        return ""
    kld = [
        [lab, str(L), _mean_se(s["kld"])] + [f"{s['kld'][k]:.6f}" for k, _ in SPREAD_COLUMNS]
        for lab, L, s in have
    ]
    dp = [
        [
            lab,
            str(L),
            _mean_se(s["delta_p"], 100, 3),
            f"{100 * s['delta_p']['rms']:.3f} ± {100 * s['delta_p']['rms_se']:.3f}",
        ]
        + [f"{100 * s['delta_p'][k]:+.3f}" for k, _ in SPREAD_COLUMNS]
        + [_mean_se(s["same_top_p"], 100, 3), f"{s['ppl_ratio']:.6f}"]
        for lab, L, s in have
    ]
    spread = [h for _, h in SPREAD_COLUMNS]
    t1 = tabulate(
        kld,
        headers=["", "length", "mean KLD ± SE", *spread],
        tablefmt=fmt,
        disable_numparse=True,
        colalign=("left",) + ("right",) * (len(spread) + 2),
    )
    t2 = tabulate(
        dp,
        headers=[
            "",
            "length",
            "mean Δp ± SE (%)",
            "RMS Δp ± SE (%)",
            *spread,
            "same top p ± SE (%)",
            "PPL ratio",
        ],
        tablefmt=fmt,
        disable_numparse=True,
        colalign=("left",) + ("right",) * (len(spread) + 5),
    )
    return (
        "KL divergence, nats (llama-perplexity's block; SE treats positions as independent):\n"
        f"{t1}\n\nΔp = p_cmp − p_ref of the actual next token, percentage points:\n{t2}"
    )


def _stats_section(record: Mapping[str, Any]) -> str:
    rows = [
        (f"`{mid}`", L, c.get("stats"))
        for mid, entry in _methods(record).items()
        for L, c in sorted(_curves(entry).items())
    ]
    return stats_block_tables(rows) or "_No statistics block in this record._"


def _engine_floor_section(record: Mapping[str, Any]) -> list[str]:
    """The llama.cpp engine floor of the run (run.engine_floor), as a section; [] for a torch run."""
    floor = (record.get("run") or {}).get("engine_floor")
    if not floor:
        return []
    return [
        "",
        "## Engine floor",
        "",
        "The reference against itself with one llama.cpp setting changed (window KL, nats; no compression). Every "
        "method runs on the reference's attention path, so a number above this is compression.",
        "",
        engine_floor_table(floor),
    ]


def engine_floor_table(floor: Mapping[str, Mapping[str, Any]], fmt: str = "github") -> str:
    """lengths × floor variants (LlamaCppHarness.engine_floor), window KL in nats; for the report and `lcc measure`."""
    names = {"flash_off": "flash attention off"}
    keys = list(floor)
    lengths = sorted({int(L) for per in floor.values() for L in per})
    rows = [[str(L)] + [fmt_kl(floor[k].get(str(L), {}).get("window_kl")) for k in keys] for L in lengths]
    heads = ["length"] + [names.get(k, k.replace("ubatch_", "micro-batch ")) for k in keys]
    return tabulate(
        rows, headers=heads, tablefmt=fmt, disable_numparse=True, colalign=("left",) + ("right",) * len(keys)
    )


def _fmt_ratio(x: Any) -> str:
    return f"{x:.3g}×" if _finite(x) else fmt_kl(x)


def _fmt_slope(x: Any) -> str:
    return f"{x:+.3f}" if _finite(x) else fmt_kl(x)


def _fmt_ci(ci: Any) -> str:
    if isinstance(ci, Sequence) and len(ci) == 2 and all(_finite(v) for v in ci):
        return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"
    return DASH


def _cell(s: Any) -> str:
    """A string safe inside a Markdown table cell (one line, no bare pipes)."""
    return " ".join(str(s).split()).replace("|", "\\|")


def _one_line(s: Any, limit: int | None = None) -> str:
    s = " ".join(str(s).split())
    return s if limit is None or len(s) <= limit else s[: limit - 1] + "…"


def _check_counts(checks: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in checks:
        counts[str(c.get("outcome"))] = counts.get(str(c.get("outcome")), 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------- markdown


def _metric_table(record: Mapping[str, Any], key: str, fmt: Any, with_bits: bool = False) -> str:
    """methods × lengths table of one curve statistic (`fmt` gets the value; the key 'top1' also gets its SE)."""
    lengths = _lengths(record)
    methods = _methods(record)
    bits = with_bits and any(_finite(_bits(e)) for e in methods.values())
    rows = []
    for mid, entry in methods.items():
        curves = _curves(entry)
        status = entry.get("status", "ok")
        row: list[str] = [_cell(mid)]
        if bits:
            row.append(f"{_bits(entry):.2f}" if _finite(_bits(entry)) else DASH)
        row += [_metric_cell(curves.get(L) or {}, key, fmt) if curves else DASH for L in lengths]
        if status != "ok":
            row[0] += f" ({status})"
        rows.append(row)
    headers = ["method"] + (["bits/weight"] if bits else []) + [str(L) for L in lengths]
    if not rows:
        return "_No methods ran._"
    return _md_table(rows, headers)


def _md_table(rows: list[list[str]], headers: list[str]) -> str:
    """A GitHub table of preformatted cells: the first column left-aligned (method names), the rest right."""
    return tabulate(
        rows,
        headers=headers,
        tablefmt="github",
        disable_numparse=True,
        colalign=("left",) + ("right",) * (len(headers) - 1),
    )


def _metric_cell(curve: Mapping[str, Any], key: str, fmt: Any) -> str:
    if key == "top1":
        return fmt_pct_se(curve.get("top1"), curve.get("top1_se"))
    return fmt(curve.get(key))


def _dp_table(record: Mapping[str, Any]) -> str:
    """methods × Δp statistics at the longest length each method has."""
    rows = []
    for mid, entry in _methods(record).items():
        curves = _curves(entry)
        if not curves:
            continue
        L = max(curves)
        c = curves[L]
        if not any(_finite(c.get(k)) for k, _ in DP_COLUMNS):
            continue  # a record written before Δp existed
        rows.append([_cell(mid), str(L)] + [fmt_dp(k, c.get(k)) for k, _ in DP_COLUMNS])
    if not rows:
        return "_No Δp statistics in this record._"
    headers = ["method", "length"] + [h for _, h in DP_COLUMNS]
    return _md_table(rows, headers)


def _growth_table(record: Mapping[str, Any]) -> str:
    lengths = _lengths(record)
    lo, hi = (lengths[0], lengths[-1]) if lengths else (None, None)
    rows = []
    growth = record.get("growth") or {}
    for mid, entry in _methods(record).items():
        curves = _curves(entry)
        g = growth.get(mid) or {}
        if not curves and not g:
            continue
        was = g.get("baseline_verdict")
        verdict = g.get("verdict") or DASH
        if was and was != verdict:
            verdict = f"**{verdict}** (changed)"
        rows.append(
            [
                _cell(mid),
                fmt_kl((curves.get(lo) or {}).get("window_kl")),
                fmt_kl((curves.get(hi) or {}).get("window_kl")),
                _fmt_ratio(g.get("ratio")),
                _fmt_slope(g.get("rel_slope")),
                _fmt_ci(g.get("ci")),
                verdict,
                was or DASH,
            ]
        )
    if not rows:
        return "_No growth statistics (no method completed)._"
    headers = [
        "method",
        f"window KL @ {lo}",
        f"window KL @ {hi}",
        "growth",
        "rel. slope / doubling",
        "90 % CI",
        "verdict",
        "baseline verdict",
    ]
    return tabulate(
        rows,
        headers=headers,
        tablefmt="github",
        disable_numparse=True,
        colalign=("left", "right", "right", "right", "right", "right", "left", "left"),
    )


MATCHED_HOW_TO_READ = (
    "Matched-target curves: each sample's last T tokens (the target) are scored at every context length L, "
    "with the L tokens that end at the target's end (one pass per length), so every column is over the same "
    "tokens and only the context changes — unlike window KL, whose positions (L/2, L] differ for each L. KL is "
    "the mean over the target tokens of all samples; top-1 and ΔNLL are over the same tokens. **log-log slope** "
    "= per sample, the least-squares slope of log KL_i(L) against log L (KL ∝ L^b; ×2^b per doubling), averaged "
    "over samples, with a 90 % Student-t interval over samples (df = n − 1). Informational: no check, no verdict."
)


def _matched_records(record: Mapping[str, Any]) -> list[tuple[str, int | None, dict, dict, str]]:
    """(method, T, curves by length, growth, status) for each method with matched curves."""
    out = []
    for mid, entry in _methods(record).items():
        T, curves, g = _matched(entry)
        if curves:
            out.append((mid, T, curves, g, str(entry.get("status", "ok"))))
    return out


def _matched_metric_table(record: Mapping[str, Any], key: str, fmt: Any) -> str:
    """methods × lengths table of one matched-curve statistic."""
    rows_in = _matched_records(record)
    lengths = sorted({L for _, _, c, _, _ in rows_in for L in c})
    rows = []
    for mid, T, curves, _, status in rows_in:
        name = _cell(mid) + (f" ({status})" if status != "ok" else "")
        rows.append(
            [name, str(T) if T is not None else DASH]
            + [_metric_cell(curves.get(L) or {}, key, fmt) if L in curves else DASH for L in lengths]
        )
    headers = ["method", "T"] + [str(L) for L in lengths]
    return _md_table(rows, headers)


def _matched_growth_table(record: Mapping[str, Any]) -> str:
    rows = []
    for mid, _T, curves, g, _ in _matched_records(record):
        lo, hi = min(curves), max(curves)
        slope = g.get("slope")
        rows.append(
            [
                _cell(mid),
                fmt_kl(curves[lo].get("window_kl")),
                fmt_kl(curves[hi].get("window_kl")),
                _fmt_ratio(g.get("ratio")),
                _fmt_slope(slope),
                _fmt_ci(g.get("ci")),
                _fmt_ratio(g.get("per_doubling")) if _finite(slope) else _cell(g.get("na") or DASH),
            ]
        )
    headers = [
        "method",
        "KL @ shortest",
        "KL @ longest",
        "ratio",
        "log-log slope b",
        "90 % CI",
        "× per doubling",
    ]
    return _md_table(rows, headers)


def _matched_sections(record: Mapping[str, Any]) -> list[str]:
    """The report's matched-target section (empty when no method has matched curves)."""
    if not _matched_records(record):
        return []
    out = ["", "## Matched-target curves (same target tokens at every length)", "", MATCHED_HOW_TO_READ]
    for title, body in (
        ("KL (nats), mean over the target tokens", _matched_metric_table(record, "window_kl", fmt_kl)),
        ("Top-1 agreement on the target (± binomial SE)", _matched_metric_table(record, "top1", fmt_pct)),
        (
            "ΔNLL on the target (nats, compressed − reference)",
            _matched_metric_table(record, "dnll", fmt_signed),
        ),
        ("Growth of the matched curves", _matched_growth_table(record)),
    ):
        out += ["", f"### {title}", "", body]
    return out


def _delta_pct(value: Any, baseline: Any) -> str:
    if not (_finite(value) and _finite(baseline)) or baseline == 0:
        return DASH
    return f"{100 * (value - baseline) / baseline:+.1f} %"


def _checks_table(record: Mapping[str, Any]) -> str:
    checks = record.get("checks") or []
    if not checks:
        return "_No checks were run._"
    rows = []
    for c in checks:
        outcome = str(c.get("outcome"))
        rows.append(
            [
                _cell(c.get("method", "?")),
                DASH if c.get("length") is None else str(c.get("length")),
                str(c.get("kind", "")),
                fmt_kl(c.get("value")),
                fmt_kl(c.get("baseline")),
                _delta_pct(c.get("value"), c.get("baseline")),
                fmt_kl(c.get("tolerance")),
                _paired_cell(c.get("paired")),
                OUTCOME_MARK.get(outcome, outcome),
            ]
        )
    headers = [
        "method",
        "length",
        "kind",
        "value",
        "baseline",
        "Δ %",
        "tolerance",
        "samples worse",
        "outcome",
    ]
    return tabulate(
        rows,
        headers=headers,
        tablefmt="github",
        disable_numparse=True,
        colalign=("left", "right", "left", "right", "right", "right", "right", "left", "left"),
    )


def _paired_cell(p: Any) -> str:
    """'3/4 (+1.2…+3.5 %)': samples worse beyond float noise, and the range of per-sample changes."""
    if not isinstance(p, Mapping) or not p.get("n"):
        return DASH
    text = f"{p.get('worse', 0)}/{p['n']}"
    lo, hi = p.get("min_rel"), p.get("max_rel")
    if _finite(lo) and _finite(hi):
        text += f" ({100 * lo:+.1f}…{100 * hi:+.1f} %)"
    return text


def _summary_lines(record: Mapping[str, Any]) -> list[str]:
    methods = _methods(record)
    checks = record.get("checks") or []
    counts = _check_counts(checks)
    errored = [m for m, e in methods.items() if e.get("status", "ok") != "ok"]
    bad = counts.get("fail", 0) + counts.get("error", 0) + len(errored)
    head = "**FAILED**" if bad else "**PASSED**"
    order = [k for k in OUTCOME_MARK if k in counts] + sorted(k for k in counts if k not in OUTCOME_MARK)
    parts = [f"{counts[k]} {k}" for k in order]
    lines = [
        f"{head} — {len(methods)} method(s), {len(checks)} check(s)"
        + (f": {', '.join(parts)}" if parts else "")
        + (f"; {len(errored)} method(s) did not complete (see Errors)" if errored else "")
        + "."
    ]
    failing = [c for c in checks if c.get("outcome") in ("fail", "error")]
    if failing:
        lines.append("")
        for c in failing:
            where = f" @ {c['length']}" if c.get("length") is not None else ""
            tol = f", tolerance {fmt_kl(c.get('tolerance'))}" if c.get("tolerance") is not None else ""
            lines.append(
                f"- {OUTCOME_MARK.get(c.get('outcome'), c.get('outcome'))}: `{c.get('method')}`{where} "
                f"{KIND_LABEL.get(c.get('kind'), c.get('kind'))} {fmt_kl(c.get('value'))} vs baseline {fmt_kl(c.get('baseline'))} "
                f"({_delta_pct(c.get('value'), c.get('baseline'))}{tol})"
            )
    return lines


def _weight_ref(c: Mapping[str, Any]) -> str:
    """'model.layers.11.mlp.down_proj[507, 1229] (30.1σ, −0.55 → 0)'."""
    try:
        return f"`{c['layer']}[{c['row']}, {c['col']}]` ({c['sigma']:.1f}σ, {c['before']:+.4g} → {c['after']:+.4g})"
    except (KeyError, TypeError, ValueError):
        return _one_line(c)


def super_weight_warning(method: str, entry: Mapping[str, Any]) -> str | None:
    """One line when the method (record entry with its method_info) zeroed a super weight, else None; the
    Markdown report and `lcc measure` print it."""
    supers = _super_weights_zeroed(entry)
    if not supers:
        return None
    o = _outliers(entry) or {}
    n, k = o.get("super_zeroed", len(supers)), o.get("k_super")
    beyond = f" beyond {k:g}σ" if _finite(k) else ""
    listed = ", ".join(_weight_ref(c) for c in supers[:4]) + (" …" if len(supers) > 4 else "")
    return (
        f"`{method}` zeroed {n} super weight(s) (|w − mean|{beyond} of its layer): {listed}; its KL measures "
        "the loss of these weights as much as the method's criterion"
    )


def _super_weight_warnings(record: Mapping[str, Any]) -> list[str]:
    """One warning line per method that zeroed a super weight."""
    lines = (super_weight_warning(mid, entry) for mid, entry in _methods(record).items())
    return [w for w in lines if w]


def _outlier_table(record: Mapping[str, Any]) -> str:
    rows = []
    for mid, entry in _methods(record).items():
        o = _outliers(entry)
        if o is None:
            continue
        top = o.get("top") or []
        rows.append(
            [
                _cell(mid),
                str(o.get("total", DASH)),
                str(o.get("changed", DASH)),
                str(o.get("zeroed", DASH)),
                str(o.get("super_zeroed", DASH)),
                _cell(_weight_ref(top[0])) if top else DASH,
            ]
        )
    if not rows:
        return "_No method recorded outlier weights (no weight method ran)._"
    first = next(o for e in _methods(record).values() if (o := _outliers(e)) is not None)
    k, frac, sup = first.get("k_sigma"), first.get("moved_frac"), first.get("k_super")
    head = (
        f"Outliers: weights with |w − mean| > {k:g}σ of their weight matrix; changed: zeroed or moved by more "
        f"than {100 * frac:g} % of their value; super: zeroed and beyond {sup:g}σ.\n\n"
        if all(_finite(x) for x in (k, frac, sup))
        else ""
    )
    return head + tabulate(
        rows,
        headers=["method", "outliers", "changed", "zeroed", "super zeroed", "largest changed"],
        tablefmt="github",
        disable_numparse=True,
        colalign=("left", "right", "right", "right", "right", "left"),
    )


def _findings_lines(record: Mapping[str, Any]) -> list[str]:
    findings = record.get("findings") or []
    if not findings:
        return ["_No findings were evaluated in this run._"]
    model = (record.get("run") or {}).get("model", "this model")
    lines: list[str] = []
    if any(f.get("parts") for f in findings):
        tt = next((f.get("target_tokens") for f in findings if f.get("target_tokens")), None)
        lines += [
            f"Judged on the matched-target curves (the same last {tt or 'T'} tokens of each sample at every length), "
            "per sample and paired across methods; b = log-log growth exponent (KL ∝ L^b). A part is 'yes' when its "
            "90 % interval lies wholly on the claimed side of 0, 'no' when wholly on the other side, else "
            "'inconclusive'; MDD = the smallest effect this sample count detects with 80 % power. A claim holds when "
            "every judged part does.",
            "",
        ]
    for f in findings:
        holds = str(f.get("holds"))
        lines.append(f"### {f.get('claim')} — {_one_line(f.get('title', ''))}")
        lines.append("")
        lines.append(f"- **Holds on {model}: {HOLDS_MARK.get(holds, '')} {holds}**".replace("  ", " "))
        lines.append(f"- Paper: {_one_line(f.get('paper', DASH))}")
        if f.get("informative"):
            lines.append(
                "- Informative (a changed verdict fails no test): judged per sample on log(copy KL / window KL) of "
                "the copy probe, averaged over the lengths where both methods have it, paired across methods"
            )
        if f.get("parts"):  # the table says what `measured` and `detail` say
            lines += ["", _parts_table(f["parts"]), ""]
        else:
            lines.append(f"- Measured: {_one_line(f.get('measured', DASH))}")
            if f.get("detail"):
                lines.append(f"- {_one_line(f['detail'])}")
        if f.get("stored") is not None or f.get("reproduced") is not None:
            rep = {True: "yes", False: "**no**", None: DASH}.get(
                f.get("reproduced"), str(f.get("reproduced"))
            )
            lines.append(
                f"- Stored verdict: {f.get('stored') if f.get('stored') is not None else DASH}; "
                f"reproduced: {rep}"
            )
        lines.append("")
    return lines[:-1]


def _parts_table(parts: Sequence[Mapping[str, Any]]) -> str:
    """A claim's tested statements (findings.Part dicts): estimate, 90 % CI, MDD, n, verdict."""
    rows = []
    for p in parts:
        unit = p.get("unit")
        f = lambda v, unit=unit: fmt_part_value(v, unit, DASH)  # noqa: E731
        verdict = str(p.get("verdict", DASH)) + ("" if p.get("judged", True) else " (reported)")
        ci = DASH if p.get("lo") is None else f"[{f(p.get('lo'))}, {f(p.get('hi'))}]"
        rows.append(
            [
                _one_line(p.get("statement", DASH)),
                _one_line(p.get("quantity", DASH)),
                f(p.get("estimate")) if p.get("na") is None else f"n/a: {_one_line(p['na'])}",
                ci,
                f(p.get("mdd")).lstrip("+"),
                str(p.get("n", DASH)),
                f"{HOLDS_MARK.get(str(p.get('verdict')), '')} {verdict}".strip(),
            ]
        )
    headers = ["statement", "quantity", "estimate", "90 % CI", "MDD (80 % power)", "n", "verdict"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _timings_table(record: Mapping[str, Any]) -> str:
    rows = []
    for mid, e in _methods(record).items():
        t = e.get("timings") or {}
        rows.append(
            [
                _cell(mid),
                str(e.get("status", "ok")),
                *(
                    f"{t[k]:.1f}" if _finite(t.get(k)) else DASH
                    for k in ("reference_s", "compression_s", "measurement_s")
                ),
                f"{_bits(e):.2f}" if _finite(_bits(e)) else DASH,
            ]
        )
    if not rows:
        return "_No methods ran._"
    return tabulate(
        rows,
        headers=["method", "status", "reference s", "compression s", "measurement s", "bits/weight"],
        tablefmt="github",
        disable_numparse=True,
    )


def _duration(run: Mapping[str, Any]) -> str:
    try:
        s = (
            datetime.fromisoformat(str(run.get("finished"))) - datetime.fromisoformat(str(run.get("started")))
        ).total_seconds()
    except (TypeError, ValueError):
        return DASH
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _run_table(record: Mapping[str, Any]) -> str:
    run = record.get("run") or {}
    versions = run.get("versions") or {}
    rows = [
        ("model", run.get("model")),
        ("engine", run.get("engine", "torch")),
        ("dtype", run.get("dtype")),
        ("device", run.get("device_type")),
        ("profile", run.get("profile")),
        ("corpus", run.get("corpus")),
        ("corpus sha256", f"`{run.get('corpus_sha256')}`" if run.get("corpus_sha256") else DASH),
        ("seed", run.get("seed")),
        ("samples", run.get("samples")),
        ("lengths", ", ".join(str(L) for L in run.get("lengths") or []) or DASH),
        ("measurement", run.get("mode")),
        (
            "design",
            run.get("design", "window")
            + (f", T = {run['target_tokens']}" if run.get("target_tokens") else ""),
        ),
        ("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or DASH),
        ("started", run.get("started")),
        ("finished", run.get("finished")),
        ("duration", _duration(run)),
        ("baseline file", f"`{run.get('baseline_file')}`" if run.get("baseline_file") else DASH),
        ("baselines updated", "yes" if run.get("update") else "no"),
    ]
    return tabulate(
        [[k, _cell(DASH if v is None else v)] for k, v in rows],
        headers=["", ""],
        tablefmt="github",
        disable_numparse=True,
    )


def _anatomy_sections(record: Mapping[str, Any]) -> list[str]:
    """The report's error-anatomy section, one subsection per method that has one (empty when none has)."""
    from .anatomy import format_tables

    found = [(m, a) for m, e in _methods(record).items() if (a := _anatomy(e)) is not None]
    if not found:
        return []
    out = [
        "",
        "## Error anatomy",
        "",
        "Where the error sits: per decoder layer and log2 position bucket, the mean relative error "
        "‖x_cmp − x_ref‖ / ‖x_ref‖ (per position, L2 over the hidden dimension) of the residual stream after "
        f"the layer, and of its keys and values (`{ANATOMY_PNG}` shows the residual stream as a heatmap).",
    ]
    for mid, a in found:
        out += ["", f"### `{mid}`", "", format_tables(a)]
    return out


def render_markdown(record: Mapping[str, Any]) -> str:
    """The full Markdown report of a run record."""
    run = record.get("run") or {}
    methods = _methods(record)
    out = [f"# Long-context KL report — {_run_title(run)}", "", HOW_TO_READ, "", "## Summary", ""]
    out += _summary_lines(record)
    sections = [
        ("Window KL (nats), mean over positions (L/2, L]", _metric_table(record, "window_kl", fmt_kl, True)),
        ("Cumulative KL (nats), mean over [0, L)", _metric_table(record, "cumulative_kl", fmt_kl)),
        ("p99 of per-position KL in the window (nats)", _metric_table(record, "p99", fmt_kl)),
        ("Top-1 agreement in the window (± binomial SE)", _metric_table(record, "top1", fmt_pct)),
        ("ΔNLL in the window (nats, compressed − reference)", _metric_table(record, "dnll", fmt_signed)),
        (
            "Reverse KL(P_cmp ‖ P_ref) in the window (nats, informational)",
            _metric_table(record, "reverse_kl", fmt_kl),
        ),
        (
            "Δp of the actual next token at the longest length (p_cmp − p_ref, informational)",
            _dp_table(record),
        ),
        ("llama.cpp's statistics per length (pooled over the window, informational)", _stats_section(record)),
        ("Growth with context", _growth_table(record)),
        ("Baseline checks", _checks_table(record)),
        ("Outlier weights changed", _outlier_table(record)),
    ]
    for title, body in sections:
        out += ["", f"## {title}", "", body]
    out += _engine_floor_section(record)
    out += _matched_sections(record)
    out += _anatomy_sections(record)
    out += _probe_section(record)
    out += ["", "## Paper findings on this model", ""] + _findings_lines(record)
    warns = [f"- {_one_line(n)}" for n in (run.get("notes") or [])]
    warns += [
        f"- `{m}`: {_one_line(e['length_dependent'])}"
        for m, e in methods.items()
        if e.get("length_dependent")
    ]
    warns += [f"- ⚠ {w}" for w in _super_weight_warnings(record)]
    if warns:
        out += ["", "## Warnings", ""] + warns
    errored = [(m, e) for m, e in methods.items() if e.get("status", "ok") != "ok"]
    if errored:
        out += ["", "## Errors", ""]
        out += [
            f"- `{m}` ({e.get('status')}): {_one_line(e.get('error') or 'no message')}" for m, e in errored
        ]
    changes = record.get("baseline_changes") or []
    if changes or run.get("update"):
        out += ["", "## Baseline changes", ""]
        out += [f"- {_one_line(c)}" for c in changes] or ["_Update mode: no stored value changed._"]
    out += ["", "## Timings", "", _timings_table(record), "", "## Run", "", _run_table(record), ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- terminal


def terminal_summary(record: Mapping[str, Any]) -> str:
    """A short plain-ASCII table for the pytest terminal summary: one row per method."""
    run = record.get("run") or {}
    lengths = _lengths(record)
    lo, hi = (lengths[0], lengths[-1]) if lengths else (None, None)
    growth = record.get("growth") or {}
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for c in record.get("checks") or []:
        by_method.setdefault(str(c.get("method")), []).append(c)
    rows, notes = [], []
    for mid, entry in _methods(record).items():
        curves = _curves(entry)
        status = entry.get("status", "ok")
        g = growth.get(mid) or {}
        counts = _check_counts(by_method.get(mid, []))
        checks = ", ".join(f"{n} {k.upper() if k in ('fail', 'error') else k}" for k, n in counts.items())
        if status != "ok":
            notes.append(f"  {mid}: {_one_line(entry.get('error') or status, 100)}")
        if status not in ("ok", "partial"):
            rows.append([mid, status.upper(), status.upper(), "-", "-", checks or "-"])
            continue
        ratio = g.get("ratio")
        rows.append(
            [
                mid,
                fmt_kl((curves.get(lo) or {}).get("window_kl")),
                fmt_kl((curves.get(hi) or {}).get("window_kl")),
                f"{ratio:.3g}x" if _finite(ratio) else "-",
                g.get("verdict") or "-",
                checks or "-",
            ]
        )
    head = (
        f"lcc-harness: {_run_title(run)}, {run.get('samples', '?')} sample(s); window KL(P_ref||P_cmp), nats"
    )
    if not rows:
        return head + "\n  no methods ran"
    table = tabulate(
        rows,
        headers=["method", f"KL@{lo}", f"KL@{hi}", "growth", "verdict", "checks"],
        tablefmt="simple",
        disable_numparse=True,
    )
    lines = [head, table.replace("—", "-")] + notes
    for mid, entry in _methods(record).items():
        c = _curves(entry).get(hi) or {}
        s = c.get("stats")
        if s:
            lines.append(
                f"  {mid} @{hi}: KLD {s['kld']['mean']:.6f} +/- {s['kld']['se']:.6f}, 99.9% {s['kld']['p99.9']:.4f}, "
                f"same top p {100 * s['same_top_p']['mean']:.2f}%, RMS dp {100 * s['delta_p']['rms']:.3f}%, "
                f"PPL ratio {s['ppl_ratio']:.4f}"
            )
    findings = record.get("findings") or []
    if findings:
        lines.append("paper claims: " + "; ".join(f"{f.get('claim')} {f.get('holds')}" for f in findings))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- writing


def _not_writable(
    out_dir: Path, err: BaseException, what: str = "report directory", option: str = "--lcc-report-dir"
) -> ReportDirError:
    if isinstance(err, WriteError):  # already one line naming the file and the fix
        return ReportDirError(str(err))
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return ReportDirError(f"{what} '{out_dir}' is not writable: {reason}; pass {option} to a writable folder")


def check_writable(
    out_dir: str | os.PathLike[str], what: str = "report directory", option: str = "--lcc-report-dir"
) -> Path:
    """Create `out_dir` and prove a file can be written there; raise ReportDirError (a HarnessError) naming
    `what` and the `option` that moves it if not."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".lcc-probe-", dir=out)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise _not_writable(out, e, what, option) from e
    return out


def _json_safe(obj: Any) -> Any:
    """`obj` with NaN/±Infinity floats as None, so the JSON is valid for every reader (a non-finite measurement
    is already a failed check, reported as such)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_reports(record: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write kl_report.json, kl_report.md and kl_vs_context.png into `out_dir` (created), and kl_anatomy.png when
    some method has an error anatomy (else a stale one is removed); return their paths.

    The JSON is the record itself (sorted keys, indent 1). Raises ReportDirError (an OSError and a
    HarnessError) naming the directory when it cannot be written.
    """
    out = Path(out_dir)
    paths = [out / REPORT_JSON, out / REPORT_MD, out / REPORT_PNG]
    anatomy_png = any(_anatomy(e) is not None for e in _methods(record).values())
    probes_png = bool(_probe_rows(record))
    renderers = [
        lambda: (
            json.dumps(_json_safe(record), indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False)
            + "\n"
        ).encode(),
        lambda: render_markdown(record).encode(),
        lambda: render_png(record),  # last: if plotting fails, the JSON and Markdown are already there
    ]
    if anatomy_png:
        paths.append(out / ANATOMY_PNG)
        renderers.append(lambda: render_anatomy_png(record))
    if probes_png:
        from .plot import render_probes_png

        paths.append(out / PROBES_PNG)
        renderers.append(lambda: render_probes_png(record))
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not anatomy_png:  # a previous run's picture would describe other results
            (out / ANATOMY_PNG).unlink(missing_ok=True)
        if not probes_png:
            (out / PROBES_PNG).unlink(missing_ok=True)
    except OSError as e:
        raise _not_writable(out, e) from e
    rendered: list[tuple[Path, bytes]] = []
    try:
        for path, render in zip(paths, renderers, strict=True):
            rendered.append((path, render()))
    finally:  # a plot that fails to render still leaves the JSON and Markdown written (as one set)
        try:
            atomic_write_many(rendered)
        except OSError as e:  # a full disk: every file stays the previous run's
            raise _not_writable(out, e) from e
    return paths


# ---------------------------------------------------------------------------------------------- probes


def _pct0(x: Any) -> str:
    return f"{100 * x:.0f} %" if _finite(x) else DASH


def probe_tables(rows: Sequence[tuple[str, Mapping[str, Any] | None]], fmt: str = "github") -> str:
    """The long-range probes (probes.summarize_probes) of several methods as tables, methods × lengths: key-token
    KL, copy at a distance, passkey per depth, where the error lives. Empty when no method has probes."""
    rows = [(m, p) for m, p in rows if isinstance(p, Mapping) and p.get("curves")]
    if not rows:
        return ""
    lengths = sorted({int(L) for _, p in rows for L in p["curves"]})

    def table(title: str, cell: Any, cols: Sequence[Any] = lengths, head: Any = str) -> str | None:
        body = [
            [_cell(m)]
            + [cell(p["curves"].get(str(c[0] if isinstance(c, tuple) else c)) or {}, c) for c in cols]
            for m, p in rows
        ]
        if all(x == DASH for r in body for x in r[1:]):
            return None
        t = tabulate(
            body,
            headers=["method"] + [head(c) for c in cols],
            tablefmt=fmt,
            disable_numparse=True,
            colalign=("left",) + ("right",) * len(cols),
        )
        return f"{title}\n\n{t}"

    def key(c: Mapping[str, Any], _: Any) -> str:
        k = c.get("keytokens")
        if not k:
            return DASH
        if k.get("kl") is None:
            return f"n/a ({k.get('na', 'no key token')})"
        return f"{fmt_kl(k['kl'])} / {fmt_kl(k.get('rest_kl'))} ({100 * k['fraction']:.1f} %, n={k['n_key']})"

    def copy(c: Mapping[str, Any], _: Any) -> str:
        k = c.get("copy")
        if not k:
            return DASH
        if k.get("kl") is None:
            return f"n/a ({k.get('na')}; d={k.get('distance')})"
        return f"{fmt_kl(k['kl'])}; {_pct0(k['ref_acc'])} / {_pct0(k['cmp_acc'])} (d={k['distance']})"

    def passkey(c: Mapping[str, Any], col: tuple[int, str]) -> str:
        k = (c.get("passkey") or {}).get(col[1])
        if not k:
            return DASH
        if k.get("kl") is None:
            return f"n/a (ref {_pct0(k.get('ref_em'))})"
        return f"{_pct0(k['ref_em'])} / {_pct0(k['cmp_em'])}; KL {fmt_kl(k['kl'])}"

    def where(c: Mapping[str, Any], _: Any) -> str:
        k = c.get("where")
        if not k:
            return DASH
        pos = " ".join(fmt_kl(x) for x in k.get("by_position") or [])
        return f"{_pct0(k['flip'])}; {pos}"

    depth_cols = [(L, d) for L in lengths for d in ("10", "50", "90")]
    parts = [
        table("Key-token KL (nats): key tokens / the rest of the window (key share, count)", key),
        table("Copy at a distance d: KL (nats); top-1 accuracy reference / compressed", copy),
        table(
            "Passkey (teacher-forced): exact match reference / compressed; KL over the key's tokens",
            passkey,
            depth_cols,
            lambda c: f"{c[0]} @{c[1]} %",
        ),
        table("Where the error lives: top-1 flip rate; window KL by position quarter (early → late)", where),
    ]
    conf = [
        [_cell(m)]
        + [fmt_kl(x) for x in (p["curves"][str(lengths[-1])].get("where") or {}).get("by_confidence", [])]
        for m, p in rows
        if (p["curves"].get(str(lengths[-1])) or {}).get("where")
    ]
    if conf:
        t = tabulate(
            conf,
            headers=["method"] + [f"{k / 10:.1f}–" for k in range(10)],
            tablefmt=fmt,
            disable_numparse=True,
        )
        parts.append(f"Window KL by reference top-1 probability at {lengths[-1]} (bins of 0.1)\n\n{t}")
    return "\n\n".join(p for p in parts if p)


def _probe_rows(record: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [
        (m, e["probes"])
        for m, e in _methods(record).items()
        if e.get("status", "ok") in ("ok", "partial") and isinstance(e.get("probes"), Mapping)
    ]


PROBES_HOW_TO_READ = (
    "Mean window KL is dominated by tokens any short context predicts; these probes look where long context "
    "matters (docs: README, Long-range probes). **Key tokens** (after LongPPL): positions whose true next token the "
    "reference predicts with the full context more than 2 nats better than with only its last 256…384 tokens, "
    "and with log-probability above −2; KL over them vs over the rest of the window (positions (L/2, L]); gated "
    "like window KL. **Copy**: a span of the sample planted early and repeated so that the repeat ends at L; "
    "KL and top-1 accuracy on its tokens 2…m, reference / compressed; gated; n/a where the reference copies "
    "< 50 %. **Passkey**: a key stated at depth 10/50/90 % of L and asked for just before L (teacher-forced); "
    "exact match reference / compressed; n/a where the reference recalls < 50 %. **Where**: top-1 flip rate and "
    f"window KL by position quarter and by the reference's confidence (`{PROBES_PNG}` plots key-token beside "
    "window KL, and copy KL)."
)


def _probe_section(record: Mapping[str, Any]) -> list[str]:
    rows = _probe_rows(record)
    if not rows:
        return []
    notes = sorted({n for _, p in rows for n in p.get("notes", [])})
    out = ["", "## Long-range probes", "", PROBES_HOW_TO_READ, "", probe_tables(rows)]
    return out + ([""] + [f"- note: {_one_line(n)}" for n in notes] if notes else [])
