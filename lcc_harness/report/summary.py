"""The answer first: the summary that opens kl_report.md (and goes to GITHUB_STEP_SUMMARY), and the pytest
terminal summary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tabulate import tabulate

from lcc_harness.record import curves as _curves
from lcc_harness.record import finite as _finite
from lcc_harness.record import lengths as _lengths
from lcc_harness.record import methods as _methods
from lcc_harness.record import run_title as _run_title
from lcc_harness.report.fmt import KIND_LABEL, OUTCOME_MARK, _check_counts, _delta_pct, _one_line, fmt_kl


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
