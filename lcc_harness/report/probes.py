"""The long-range probes' tables (key tokens, copy, passkey, where) and their report section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tabulate import tabulate

from lcc_harness.record import methods as _methods
from lcc_harness.report.fmt import DASH, PROBES_PNG, _cell, _one_line, _pct0, fmt_kl


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
