"""Tables of the curves: window / cumulative KL and the other metrics per length, Δp, llama.cpp's statistics block,
the engine floor, growth, and the matched-target design."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tabulate import tabulate

from lcc_harness.record import bits as _bits
from lcc_harness.record import curves as _curves
from lcc_harness.record import finite as _finite
from lcc_harness.record import lengths as _lengths
from lcc_harness.record import matched as _matched
from lcc_harness.record import methods as _methods
from lcc_harness.report.fmt import (
    DASH,
    DP_COLUMNS,
    _cell,
    _fmt_ci,
    _fmt_ratio,
    _fmt_slope,
    _md_table,
    _mean_se,
    fmt_dp,
    fmt_kl,
    fmt_pct,
    fmt_pct_se,
    fmt_signed,
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


def _reverse_kl_table(record: Mapping[str, Any]) -> str:
    """methods × lengths of reverse KL, or a line saying how to get it when no method's curves hold it (the run
    did not ask for it: RunConfig.reverse_kl)."""
    if not any(_finite(c.get("reverse_kl")) for e in _methods(record).values() for c in _curves(e).values()):
        return (
            "_Not computed in this run; pass `--lcc-reverse-kl` (pytest) or `--reverse-kl` (`lcc measure`)._"
        )
    return _metric_table(record, "reverse_kl", fmt_kl)


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
