"""bench.json and bench.md from the numbers the benchmarks collected (written atomically at session end)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from lcc_harness.files import write_json

if TYPE_CHECKING:
    from bench.session import Bench

MIB = 1024 * 1024
COMMAND = "make bench  # = pytest bench/ --benchmark-only"


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def _sec(x: float | None) -> str:
    """Seconds: two decimals below 10 s, one above."""
    return "—" if x is None else format(x, ".2f" if x < 10 else ".1f")


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def summarize(b: Bench, machine: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The bench.json object: the issue's keys plus the details they are computed from."""
    from bench.session import GOALS

    r, cfg = b.results, b.cfg
    rounds = r.get("forward_rounds_s", [])
    forward_s = statistics.median(rounds) if rounds else None
    per = r.get("per_method_s", {})
    ratio = {m: t / forward_s for m, t in per.items()} if forward_s else {}
    own = {m: per[m] / f for m, f in r.get("own_forward_s", {}).items() if m in per}
    per_exact = r.get("per_method_exact_s", {})
    ratio_exact = {m: t / forward_s for m, t in per_exact.items()} if forward_s else {}
    agree = {}
    for m, by_len in r.get("summary_vs_exact", {}).items():
        agree[m] = max(
            abs(v["window_kl"][1] - v["window_kl"][0]) / max(abs(v["window_kl"][0]), 1e-12)
            for v in by_len.values()
        )
    rss = r.get("rss", {})
    vocab = getattr(getattr(b._lm, "model", None), "config", None)
    vocab = getattr(vocab, "vocab_size", None)
    lv = {L: int(L) * vocab * 4 / MIB for L in rss} if vocab else {}
    weights = max((x["weights_mb"] for x in rss.values()), default=None)
    headroom = {L: x["peak_rss_mb"] - x["weights_mb"] for L, x in rss.items()}
    longest = max(rss, key=int) if rss else None
    ref = r.get("reference", {})
    ref_per_sample = ref["cold_s"] / cfg.samples / forward_s if forward_s and "cold_s" in ref else None
    goals = {
        "ratio_to_forward": {
            "goal": f"≤ {GOALS['ratio_to_forward']:.2f}",
            "worst": max(ratio.values()) if ratio else None,
            "met": (max(ratio.values()) <= GOALS["ratio_to_forward"]) if ratio else None,
        },
        "naive_speedup": {
            "goal": f"≥ {GOALS['naive_speedup']:.0f}×",
            "value": r.get("naive_speedup"),
            "met": (r["naive_speedup"] >= GOALS["naive_speedup"]) if "naive_speedup" in r else None,
        },
        "peak_rss": {
            "goal": f"peak ≤ weights + {GOALS['rss_headroom_mb'] / 1024:.1f} GiB at {longest}",
            "headroom_mb": headroom.get(longest) if longest else None,
            "met": (headroom[longest] <= GOALS["rss_headroom_mb"]) if longest else None,
        },
    }
    loads = [x for t in b.loads for x in (t["before"], t["after"]) if x]
    return {
        "machine": machine,
        "config": {
            "model": cfg.model,
            "lengths": list(cfg.lengths),
            "samples": cfg.samples,
            "ratio_methods": list(cfg.ratio_methods),
            "compress_methods": list(cfg.compress_methods),
            "naive_methods": list(cfg.naive_methods),
            "rss_lengths": list(cfg.rss_lengths),
            "chunk_size": cfg.chunk_size,
            "threads": cfg.threads,
        },
        "command": COMMAND,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": wall_s,
        "load_s": r.get("load_s"),
        "load_average": {
            "min_1m": min((x[0] for x in loads), default=None),
            "max_1m": max((x[0] for x in loads), default=None),
            "per_test": b.loads,
        },
        "forward_s": forward_s,
        "forward_rounds_s": rounds,
        "per_method_s": per,
        "ratio_to_forward": ratio,
        "own_forward_s": r.get("own_forward_s", {}),
        "ratio_to_own_forward": own,
        "per_method_exact_s": per_exact,
        "ratio_to_forward_exact": ratio_exact,
        "summary_window_kl_rel_diff": agree,
        "compress_s": r.get("compress_s", {}),
        "naive_speedup": r.get("naive_speedup"),
        "naive_speedup_cached": _cached_speedup(r),
        "naive": r.get("naive"),
        "reference": {**ref, "per_sample_ratio_to_forward": ref_per_sample},
        "cache_hit_ratio": r.get("cache_hit_ratio"),
        "peak_rss_mb": {L: x["peak_rss_mb"] for L, x in rss.items()},
        "peak_rss_after_load_mb": {L: x.get("peak_after_load_mb") for L, x in rss.items()},
        "rss_headroom_mb": headroom,
        "logits_fp32_mb": lv,
        "rss_detail": rss,
        "rss_copy": r.get("rss_copy", {}),
        "xdist": r.get("xdist", {}),
        "weights_mb": weights,
        "window_kl": r.get("window_kl", {}),
        "errors": r.get("errors", {}),
        "goals": goals,
    }


def _cached_speedup(r: dict[str, Any]) -> float | None:
    """Naive whole run over the one-pass run of a second session (reference from the cache)."""
    nv, ref = r.get("naive"), r.get("reference", {})
    if not nv or "hit_s" not in ref:
        return None
    return nv["naive_s"] / (nv["one_pass_s"] - nv["one_pass_parts"]["reference_s"] + ref["hit_s"])


def markdown(s: dict[str, Any]) -> str:
    """bench.md: what ran where, the goals, and one table per measurement."""
    m, c, g, ref = s["machine"], s["config"], s["goals"], s["reference"]
    la = s["load_average"]
    gh = "github"
    out = [
        "# lcc-harness benchmarks",
        "",
        f"`{s['command']}` — {c['model']}, {m['device']} {m['dtype']}, lengths "
        f"{', '.join(map(str, c['lengths']))}, {c['samples']} samples; {m['cpu']}, {m['cores']} cores, "
        f"{m['torch_threads']} torch threads, {m['memory_gb']} GB; torch {m['torch']}, transformers "
        f"{m['transformers']}. Whole run {s['wall_s'] / 60:.1f} min; 1-min load average "
        f"{_fmt(la['min_1m'], '.1f')}–{_fmt(la['max_1m'], '.1f')} on {m['cores']} cores. {s['finished']}.",
        "",
        tabulate(
            [
                [
                    "measurement / forward, worst method",
                    _fmt(g["ratio_to_forward"]["worst"], ".3f"),
                    g["ratio_to_forward"]["goal"],
                    _verdict(g["ratio_to_forward"]["met"]),
                ],
                [
                    "… ÷ the compressed model's own forward, worst",
                    _fmt(max(s["ratio_to_own_forward"].values(), default=None), ".3f"),
                    g["ratio_to_forward"]["goal"],
                    "",
                ],
                [
                    "… direct path (reference_summary=False), worst",
                    _fmt(max(s["ratio_to_forward_exact"].values(), default=None), ".3f"),
                    g["ratio_to_forward"]["goal"],
                    "",
                ],
                [
                    "naive whole run / one-pass whole run",
                    _fmt(g["naive_speedup"]["value"], ".2f"),
                    g["naive_speedup"]["goal"],
                    _verdict(g["naive_speedup"]["met"]),
                ],
                [
                    "… one-pass run with a cached reference",
                    _fmt(s["naive_speedup_cached"], ".2f"),
                    g["naive_speedup"]["goal"],
                    "",
                ],
                [
                    "peak RSS − weights (MiB)",
                    _fmt(g["peak_rss"]["headroom_mb"], ".0f"),
                    g["peak_rss"]["goal"],
                    _verdict(g["peak_rss"]["met"]),
                ],
                ["reference: cache hit / cold", _fmt(s["cache_hit_ratio"], ".4f"), "≈ 0", ""],
            ],
            headers=["", "value", "goal", ""],
            tablefmt=gh,
        ),
        "",
        f"Unit: one plain `model(ids)` forward at {c['lengths'][-1]} tokens = **{_sec(s['forward_s'])} s** "
        f"(median of {len(s['forward_rounds_s'])}: {', '.join(f'{x:.1f}' for x in s['forward_rounds_s'])}). "
        f"Reference: {_sec(ref.get('cold_s'))} s cold ({_fmt(ref.get('per_sample_ratio_to_forward'), '.2f')}"
        f" forward per sample, of which {_sec(ref.get('summary_s'))} s RefSummary), "
        f"{_fmt(ref.get('hit_s'), '.2f')} s from the cache.",
        "",
        "## Per method",
        "",
        "*measure* = every length from one pass per sample, the default path: the compressed model's body "
        "and LM head, float32 log-sum-exp, and the KL against the reference's cached RefSummary (its "
        "distributions reduced once per reference). *own forward* = a plain forward of the compressed model "
        "(hooks that simulate activation or KV-cache quantization cost time before any measuring). *direct* "
        "= the same with `RunConfig(reference_summary=False)`: the reference's LM head and log-softmax "
        "recomputed for every method; *Δ* = the largest relative difference of a window KL between the two "
        "paths.",
        "",
    ]
    methods = list(dict.fromkeys([*s["compress_s"], *s["per_method_s"], *s["errors"]]))
    rows = [
        [
            mid,
            _sec(s["compress_s"].get(mid)),
            _sec(s["per_method_s"].get(mid)),
            _fmt(s["ratio_to_forward"].get(mid), ".3f"),
            _fmt(s["ratio_to_own_forward"].get(mid), ".3f"),
            _fmt(s["ratio_to_forward_exact"].get(mid), ".3f"),
            _fmt(s["summary_window_kl_rel_diff"].get(mid), ".0e"),
            s["errors"].get(mid, "")[:80],
        ]
        for mid in methods
    ]
    out += [
        tabulate(
            rows,
            headers=[
                "method",
                "compress s",
                "measure s / sample",
                "÷ forward",
                "÷ own forward",
                "÷ forward, direct",
                "Δ",
                "note",
            ],
            tablefmt=gh,
        ),
        "",
    ]
    nv = s.get("naive")
    if nv:
        out += [
            "## Naive protocol",
            "",
            f"Methods {', '.join(nv['methods'])}. Naive = one pass per length and the reference recomputed "
            "for every method (no cache); one-pass = one reference (cold, written to the cache) and one "
            "pass per sample per method. Both include compression.",
            "",
        ]
        rows = [
            [
                mid,
                _sec(p["reference_s"]),
                _sec(p["compress_s"]),
                _sec(p["measure_s"]),
                _sec(nv["one_pass_parts"][mid]["compress_s"]),
                _sec(nv["one_pass_parts"][mid]["measure_s"]),
            ]
            for mid, p in nv["naive_parts"].items()
        ]
        rows.append(["reference (one-pass: once)", "", "", "", "", _sec(nv["one_pass_parts"]["reference_s"])])
        rows.append(["**whole run**", "", "", f"**{nv['naive_s']:.1f}**", "", f"**{nv['one_pass_s']:.1f}**"])
        out += [
            tabulate(
                rows,
                headers=[
                    "method",
                    "naive: reference s",
                    "compress s",
                    "measure s",
                    "one-pass: compress s",
                    "measure s",
                ],
                tablefmt=gh,
            ),
            "",
            f"Speed-up {s['naive_speedup']:.2f}× ({nv['speedup_without_compression']:.2f}× without compression; "
            f"{_fmt(s['naive_speedup_cached'], '.2f')}× when the one-pass run finds its reference in the "
            "cache).",
            "",
        ]
    if s["rss_detail"]:
        out += [
            "## Peak memory",
            "",
            "Each length in a fresh process: load, reference, compressed copy (the first ratio method), "
            "measurement. *weights* = parameters of the reference and the compressed copy; *after load* = the "
            "peak of reference + compression + measurement alone; a [L, V] float32 logits tensor is shown "
            "for scale (none is allocated).",
            "",
        ]
        rows = []
        for L in sorted(s["rss_detail"], key=int):
            d = s["rss_detail"][L]
            rows.append(
                [
                    L,
                    _fmt(d["peak_rss_mb"], ".0f"),
                    _fmt(d.get("peak_after_load_mb"), ".0f"),
                    _fmt(d["weights_mb"], ".0f"),
                    _fmt(s["rss_headroom_mb"][L], ".0f"),
                    _fmt(s["logits_fp32_mb"].get(L), ".0f"),
                ]
            )
        out += [
            tabulate(
                rows,
                headers=[
                    "length",
                    "peak RSS MiB",
                    "after load MiB",
                    "weights MiB",
                    "peak − weights",
                    "[L, V] fp32 MiB",
                ],
                tablefmt=gh,
            ),
            "",
        ]
    for L, d in sorted(s.get("rss_copy", {}).items()):
        inplace = s["rss_detail"].get(L, {})
        out += [
            f"In place vs deep copy at {L}: peak RSS {_fmt(inplace.get('peak_rss_mb'), '.0f')} MiB vs "
            f"{_fmt(d['peak_rss_mb'], '.0f')} MiB; weights held {_fmt(inplace.get('weights_mb'), '.0f')} MiB "
            f"(model + host snapshot {_fmt(inplace.get('snapshot_mb'), '.0f')}) vs {_fmt(d['weights_mb'], '.0f')} "
            "MiB (reference + copy). On a CPU both hold two copies; on a GPU only the in-place device holds one.",
            "",
        ]
    if s.get("xdist"):
        x = s["xdist"]
        out += ["## Workers", ""]
        out += [
            f"- `-n {k[1:]}`: {v['seconds']:.0f} s ({v['profile']} profile; {v['result']})"
            for k, v in sorted(x.items())
        ]
        out += [""]
    return "\n".join(out)


def write_report(b: Bench, machine: dict[str, Any], wall_s: float) -> list[Path]:
    """Write `<report>.json` and `<report>.md`; returns their paths."""
    s = summarize(b, machine, wall_s)
    stem = Path(b.cfg.report)
    js, md = stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.md"
    write_json(js, s)
    tmp = md.parent / f".{md.name}.tmp"
    tmp.write_text(markdown(s) + "\n")
    tmp.replace(md)
    return [js, md]
