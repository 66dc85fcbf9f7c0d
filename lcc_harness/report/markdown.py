"""kl_report.md: the answer first (summary.py: the verdict, the run, the gate per method, each claim, the plot),
then how to read it, then the detail tables of every section."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lcc_harness.record import methods as _methods
from lcc_harness.report.curves import (
    _dp_table,
    _engine_floor_section,
    _growth_table,
    _matched_sections,
    _metric_table,
    _reverse_kl_table,
    _stats_section,
)
from lcc_harness.report.fmt import _one_line, fmt_kl, fmt_pct, fmt_signed
from lcc_harness.report.probes import _probe_section
from lcc_harness.report.sections import (
    _anatomy_sections,
    _checks_table,
    _findings_lines,
    _outlier_table,
    _run_table,
    _super_weight_warnings,
    _timings_table,
)
from lcc_harness.report.summary import summary_markdown

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


def render_markdown(record: Mapping[str, Any]) -> str:
    """The full Markdown report of a run record."""
    run = record.get("run") or {}
    methods = _methods(record)
    out = [summary_markdown(record).rstrip("\n"), "", "## How to read this report", "", HOW_TO_READ]
    sections = [
        ("Window KL (nats), mean over positions (L/2, L]", _metric_table(record, "window_kl", fmt_kl, True)),
        ("Cumulative KL (nats), mean over [0, L)", _metric_table(record, "cumulative_kl", fmt_kl)),
        ("p99 of per-position KL in the window (nats)", _metric_table(record, "p99", fmt_kl)),
        ("Top-1 agreement in the window (± binomial SE)", _metric_table(record, "top1", fmt_pct)),
        ("ΔNLL in the window (nats, compressed − reference)", _metric_table(record, "dnll", fmt_signed)),
        (
            "Reverse KL(P_cmp ‖ P_ref) in the window (nats, informational)",
            _reverse_kl_table(record),
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
