"""The report's other sections: baseline checks, outlier weights, paper findings, timings, the run, error anatomy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from tabulate import tabulate

from lcc_harness.record import anatomy as _anatomy
from lcc_harness.record import bits as _bits
from lcc_harness.record import finite as _finite
from lcc_harness.record import methods as _methods
from lcc_harness.record import outliers as _outliers
from lcc_harness.record import super_weights_zeroed as _super_weights_zeroed
from lcc_harness.report.fmt import (
    ANATOMY_PNG,
    DASH,
    HOLDS_MARK,
    OUTCOME_MARK,
    _cell,
    _delta_pct,
    _one_line,
    _paired_cell,
    fmt_kl,
)
from lcc_harness.verdicts.claims import fmt_part_value


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
        ("commit", f"`{run.get('commit')}`" if run.get("commit") else DASH),
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
    from lcc_harness.measure.anatomy import format_tables

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
