"""The answer first: the summary that opens kl_report.md (and goes to GITHUB_STEP_SUMMARY), and the pytest
terminal summary."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from lcc_harness.record import curves as _curves
from lcc_harness.record import finite as _finite
from lcc_harness.record import lengths as _lengths
from lcc_harness.record import methods as _methods
from lcc_harness.record import run_title as _run_title
from lcc_harness.report.fmt import (
    DASH,
    HOLDS_MARK,
    KIND_LABEL,
    OUTCOME_MARK,
    REPORT_PNG,
    _check_counts,
    _delta_pct,
    _md_table,
    _one_line,
    fmt_kl,
)

SUMMARY_MAX_LINES = 40  # the summary that opens kl_report.md: the answer on the first screen
TITLE_LINES = 4  # '# title', '', '## Summary', '' before summary_lines
FAILING_LINES = 5  # failing checks spelled out under the verdict line; the gate table has the rest
GATE_ORDER = ("fail", "error", "missing", "better", "changed", "updated", "pass", "n/a")  # worst first


def _verdict_lines(record: Mapping[str, Any]) -> list[str]:
    """'**PASSED** — 11 method(s), 143 check(s): 121 pass, 22 n/a.' and the first failing checks."""
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
        for c in failing[:FAILING_LINES]:
            where = f" @ {c['length']}" if c.get("length") is not None else ""
            tol = f", tolerance {fmt_kl(c.get('tolerance'))}" if c.get("tolerance") is not None else ""
            lines.append(
                f"- {OUTCOME_MARK.get(c.get('outcome'), c.get('outcome'))}: `{c.get('method')}`{where} "
                f"{KIND_LABEL.get(c.get('kind'), c.get('kind'))} {fmt_kl(c.get('value'))} vs baseline "
                f"{fmt_kl(c.get('baseline'))} ({_delta_pct(c.get('value'), c.get('baseline'))}{tol})"
            )
        if len(failing) > FAILING_LINES:
            lines.append(f"- … and {len(failing) - FAILING_LINES} more (see Baseline checks)")
    return lines


def _run_line(record: Mapping[str, Any]) -> str:
    """The run in one line: model, engine, dtype and device, methods, lengths, samples, commit."""
    run = record.get("run") or {}
    commit = run.get("commit")
    version = (run.get("versions") or {}).get("harness")
    source = f"commit `{commit}`" if commit else f"lcc-harness {version}" if version else "commit —"
    lengths = ", ".join(str(L) for L in run.get("lengths") or []) or DASH
    return (
        f"**Run:** `{run.get('model', '?')}` · engine {run.get('engine', 'torch')} · {run.get('dtype', '?')} on "
        f"{run.get('device_type', '?')} · {len(_methods(record))} method(s) · lengths {lengths} · "
        f"{run.get('samples', '?')} sample(s) · profile {run.get('profile', DASH)} · {source}"
    )


def _worst_kl(checks: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The window-KL check nearest its limit: the largest (value − baseline) ÷ tolerance."""
    scored = [
        c
        for c in checks
        if c.get("kind") == "kl"
        and _finite(c.get("value"))
        and _finite(c.get("baseline"))
        and _finite(c.get("tolerance"))
        and c["tolerance"] > 0
    ]
    return max(scored, key=lambda c: (c["value"] - c["baseline"]) / c["tolerance"], default=None)


def gate_rows(record: Mapping[str, Any]) -> list[list[str]]:
    """Per method: the gate (its worst check outcome, or the method's status when it did not complete), the
    length whose window KL is nearest its limit, that KL, its baseline, and the change as a share of the
    tolerance (100 % = at the limit)."""
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for c in record.get("checks") or []:
        by_method.setdefault(str(c.get("method")), []).append(c)
    rows = []
    for mid, entry in _methods(record).items():
        checks = by_method.get(mid, [])
        outcomes = {str(c.get("outcome")) for c in checks}
        worst = next((o for o in GATE_ORDER if o in outcomes), None)
        status = entry.get("status", "ok")
        if status != "ok" and worst not in ("fail", "error"):
            gate = f"⚠ {status}"
        elif worst is None:
            gate = "no checks"
        else:
            gate = OUTCOME_MARK.get(worst, worst)
        w = _worst_kl(checks)
        if (
            w is None
        ):  # nothing to compare with (no baseline, or it is being written): the longest length's KL
            kl = [c for c in checks if c.get("kind") == "kl" and _finite(c.get("value"))]
            last = max(kl, key=lambda c: c.get("length") or 0, default=None)
            rows.append(
                [f"`{mid}`", gate]
                + ([str(last.get("length")), fmt_kl(last["value"])] if last else [DASH, DASH])
                + [DASH, DASH]
            )
            continue
        share = (w["value"] - w["baseline"]) / w["tolerance"]
        rows.append(
            [
                f"`{mid}`",
                gate,
                str(w.get("length")),
                fmt_kl(w["value"]),
                fmt_kl(w["baseline"]),
                f"{_delta_pct(w['value'], w['baseline'])} ({100 * share:+.0f} % of the ±{fmt_kl(w['tolerance'])} allowed)",
            ]
        )
    return rows


def _gate_table(record: Mapping[str, Any], room: int) -> list[str]:
    """The gate table in at most `room` lines (≥ 4): failing and incomplete methods first when it must be cut,
    then a line counting the rest."""
    rows = gate_rows(record)
    if not rows:
        return ["_No methods ran._"]
    shown, cut = rows, []
    fit = max(room - 3, 1)  # header, rule and the line counting what was cut
    if len(rows) > fit + 1:
        order = [r for r in rows if not r[1].startswith("✅")] + [r for r in rows if r[1].startswith("✅")]
        shown, cut = order[:fit], order[fit:]
    headers = ["method", "gate", "worst length", "window KL", "baseline", "change vs tolerance"]
    table = _md_table(shown, headers).splitlines()
    if cut:
        bad = sum(not r[1].startswith("✅") for r in cut)
        tail = f", {bad} of them not passing" if bad else ", every check passing"
        table.append(f"_… and {len(cut)} more method(s){tail} (see Baseline checks)._")
    return table


def _claim_lines(record: Mapping[str, Any]) -> list[str]:
    lines = []
    for f in record.get("findings") or []:
        holds = str(f.get("holds"))
        note = " (informative)" if f.get("informative") else ""
        if f.get("reproduced") is False:
            note += f"; stored verdict was '{f.get('stored')}'"
        lines.append(
            f"- {HOLDS_MARK.get(holds, '')} **{holds}** — `{f.get('claim')}`: {_one_line(f.get('title', ''), 140)}{note}"
        )
    return lines


def summary_lines(record: Mapping[str, Any]) -> list[str]:
    """The summary that opens the report, SUMMARY_MAX_LINES at most with the report's title: the verdict, the run,
    the gate per method (cut to fit, failing methods first), each claim's verdict, the plot."""
    head = _verdict_lines(record) + ["", _run_line(record), ""]
    claims = _claim_lines(record)
    tail = (
        ["", "**Paper claims on this model** (detail under Paper findings):", ""] + claims if claims else []
    )
    tail += ["", f"![window KL vs context length]({REPORT_PNG})"]
    gate_title = ["**Gate per method** (window KL at the length nearest its limit):", ""]
    room = SUMMARY_MAX_LINES - TITLE_LINES - len(head) - len(gate_title) - len(tail)
    return head + gate_title + _gate_table(record, max(room, 4)) + tail


def summary_markdown(record: Mapping[str, Any]) -> str:
    """The report's opening: its title and the summary (what GITHUB_STEP_SUMMARY receives)."""
    return (
        "\n".join(
            [f"# Long-context KL report — {_run_title(record.get('run') or {})}", "", "## Summary", ""]
            + summary_lines(record)
        )
        + "\n"
    )


def append_step_summary(record: Mapping[str, Any]) -> Path | None:
    """Append summary_markdown to the file GITHUB_STEP_SUMMARY names (GitHub Actions shows it on the run's page);
    None when the variable is not set."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return None
    with open(path, "a", encoding="utf-8") as f:
        f.write(summary_markdown(record) + "\n")
    return Path(path)


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
