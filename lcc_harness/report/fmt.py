"""The report's cells: how a KL, a percentage, an interval or an outcome is written, and the report's file names."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from tabulate import tabulate

from lcc_harness.record import finite as _finite

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


def _mean_se(d: Mapping[str, Any], scale: float = 1.0, digits: int = 6) -> str:
    m, se = d.get("mean"), d.get("se")
    if not _finite(m):
        return DASH
    return f"{scale * m:.{digits}f} ± {scale * se:.{digits}f}" if _finite(se) else f"{scale * m:.{digits}f}"


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


def _md_table(rows: list[list[str]], headers: list[str]) -> str:
    """A GitHub table of preformatted cells: the first column left-aligned (method names), the rest right."""
    return tabulate(
        rows,
        headers=headers,
        tablefmt="github",
        disable_numparse=True,
        colalign=("left",) + ("right",) * (len(headers) - 1),
    )


def _delta_pct(value: Any, baseline: Any) -> str:
    if not (_finite(value) and _finite(baseline)) or baseline == 0:
        return DASH
    return f"{100 * (value - baseline) / baseline:+.1f} %"


def _paired_cell(p: Any) -> str:
    """'3/4 (+1.2…+3.5 %)': samples worse beyond float noise, and the range of per-sample changes."""
    if not isinstance(p, Mapping) or not p.get("n"):
        return DASH
    text = f"{p.get('worse', 0)}/{p['n']}"
    lo, hi = p.get("min_rel"), p.get("max_rel")
    if _finite(lo) and _finite(hi):
        text += f" ({100 * lo:+.1f}…{100 * hi:+.1f} %)"
    return text


def _pct0(x: Any) -> str:
    return f"{100 * x:.0f} %" if _finite(x) else DASH
