"""The report's picture: window KL against context length (log2 axis), one line per method with its CI band over
samples and the stored baseline dashed, as PNG bytes."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lcc_harness.measure.growth import CI_LEVEL
from lcc_harness.measure.stats import t_interval
from lcc_harness.record import anatomy as _anatomy
from lcc_harness.record import baseline_kl as _baseline_kl
from lcc_harness.record import bits as _bits
from lcc_harness.record import curves as _curves
from lcc_harness.record import finite as _finite
from lcc_harness.record import lengths as _lengths
from lcc_harness.record import matched as _matched
from lcc_harness.record import methods as _methods
from lcc_harness.record import run_title as _run_title


def mean_band(values: Sequence[float], level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(mean, lo, hi) of per-sample values: the `level` Student-t interval of the mean (stats.t_interval, the
    interval the findings use), lo = hi = mean with one value, NaN without a finite one."""
    x = [float(v) for v in values if _finite(v)]
    if not x:
        return (math.nan, math.nan, math.nan)
    mean, lo, hi = t_interval(x, level)
    return (mean, mean, mean) if len(x) == 1 else (mean, lo, hi)


def render_png(record: Mapping[str, Any]) -> bytes:
    """Window KL vs context length (log2 x axis), one line per completed method, as PNG bytes; when the record has
    matched-target curves, a second panel shows them (same colours; the only panel for a matched-only run)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    run = record.get("run") or {}
    lengths = _lengths(record)
    series = []  # (method, xs, means, los, his, baseline xs, baseline ys, n samples)
    for mid, entry in _methods(record).items():
        curves = _curves(entry)
        if not curves:
            continue
        xs, ms, los, his, ns = [], [], [], [], []
        for L in sorted(curves):
            c = curves[L]
            per = (c.get("per_sample") or {}).get("window_kl") or []
            m, lo, hi = mean_band(per) if per else (c.get("window_kl"), None, None)
            if not _finite(m):
                continue
            xs.append(L)
            ms.append(float(c["window_kl"]) if _finite(c.get("window_kl")) else m)
            los.append(lo if _finite(lo) else ms[-1])
            his.append(hi if _finite(hi) else ms[-1])
            ns.append(len(per))
        bl = [(L, _baseline_kl(record, mid, L)) for L in lengths]
        bl = [(L, v) for L, v in bl if v is not None]
        series.append((mid, _bits(entry), xs, ms, los, his, bl, max(ns, default=0)))

    matched = _matched_series(record)
    positive = [v for s in series for v in s[3] + [b for _, b in s[6]] if v > 0]
    log_y = bool(positive) and max(positive) / min(positive) > 10  # over a decade: log axis

    n_rows_legend = math.ceil((len(series) + 1) / 3) if series else 1
    two = bool(matched) and bool(series)
    fig = Figure(figsize=(18 if two else 11, 6.0 + 0.28 * n_rows_legend), dpi=110, layout="constrained")
    ax = fig.add_subplot(1, 2 if two else 1, 1)
    # tab10 (the default cycle); past 10 methods, tab20's lighter shades follow, so no two methods share a colour
    colors = [f"C{i}" for i in range(10)] + [colormaps["tab20"](2 * k + 1) for k in range(10)]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
    order = {mid: i for i, mid in enumerate(dict.fromkeys([s[0] for s in series] + [m[0] for m in matched]))}
    if matched and not series:  # matched curves only: they are the one panel
        _matched_panel(ax, matched, order, colors, markers, run, with_legend=True)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    if two:
        _matched_panel(fig.add_subplot(1, 2, 2), matched, order, colors, markers, run, with_legend=False)
    hidden = []
    for mid, bits, xs, ms, los, his, bl, _n in series:
        i = order[mid]
        color, marker = colors[i % len(colors)], markers[(i + i // 10) % len(markers)]
        label = mid + (f"  ({bits:.2f} b/w)" if _finite(bits) else "")
        if log_y and all(m <= 0 for m in ms):
            hidden.append(mid)
            label += "  [KL = 0, off the log axis]"
        ys = [m if (m > 0 or not log_y) else np.nan for m in ms]
        ax.plot(xs, ys, color=color, marker=marker, markersize=7, linewidth=2, label=label, zorder=3)
        if any(h > lo for lo, h in zip(los, his, strict=True)):
            lo_b = [max(v, min(positive) / 10) if log_y else v for v in los] if positive else los
            ax.fill_between(xs, lo_b, his, color=color, alpha=0.18, linewidth=0, zorder=2)
        if bl:
            ax.plot(
                [L for L, _ in bl],
                [v if (v > 0 or not log_y) else np.nan for _, v in bl],
                color=color,
                linestyle="--",
                linewidth=1.4,
                alpha=0.9,
                zorder=2,
            )

    _context_axes(ax, lengths, log_y, "window KL(P_ref ‖ P_cmp), nats")
    ax.set_title(f"Window KL vs context length — {_run_title(run)}", fontsize=15, pad=26)
    n_samples = max((s[7] for s in series), default=0)
    notes = ["window = positions (L/2, L]"]
    if series:
        notes.append(
            f"band = 90 % t-interval of the mean over {n_samples} samples"
            if n_samples >= 2
            else "one sample: no band"
        )
    if any(s[6] for s in series):
        notes.append("dashed = stored baseline")
    notes.append(f"corpus {run.get('corpus', '?')}")
    ax.text(
        0.5,
        1.015,
        "; ".join(notes),
        transform=ax.transAxes,
        ha="center",
        va="bottom",
        fontsize=10.5,
        color="0.3",
    )
    if not series:
        ax.text(
            0.5, 0.5, "no method completed", transform=ax.transAxes, ha="center", va="center", fontsize=16
        )
    else:
        handles, labels = ax.get_legend_handles_labels()
        if any(s[6] for s in series):
            handles.append(Line2D([], [], color="0.35", linestyle="--", linewidth=1.4))
            labels.append("stored baseline (same colour)")
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncol=min(3, len(handles)),
            fontsize=11.5,
            frameon=False,
        )
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _matched_series(record: Mapping[str, Any]) -> list[tuple]:
    """(method, bits, T, xs, means, los, his, n samples) of each method's matched-target curves."""
    out = []
    for mid, entry in _methods(record).items():
        T, curves, _ = _matched(entry)
        if not curves:
            continue
        xs, ms, los, his, ns = [], [], [], [], []
        for L in sorted(curves):
            per = (curves[L].get("per_sample") or {}).get("window_kl") or []
            m, lo, hi = mean_band(per) if per else (curves[L].get("window_kl"), None, None)
            if not _finite(m):
                continue
            xs.append(L)
            ms.append(m)
            los.append(lo if _finite(lo) else m)
            his.append(hi if _finite(hi) else m)
            ns.append(len(per))
        out.append((mid, _bits(entry), T, xs, ms, los, his, max(ns, default=0)))
    return out


def _matched_panel(
    ax: Any,
    series: list[tuple],
    order: Mapping[str, int],
    colors: Sequence[str],
    markers: Sequence[str],
    run: Mapping[str, Any],
    with_legend: bool,
) -> None:
    """Matched-target KL vs context length on `ax`: one line per method (colour and marker as in the window
    panel) with its CI band over samples; log y axis when the values span over a decade."""
    positive = [v for s in series for v in s[4] if v > 0]
    log_y = bool(positive) and max(positive) / min(positive) > 10
    lengths = sorted({L for s in series for L in s[3]})
    for mid, bits, _T, xs, ms, los, his, _n in series:
        i = order[mid]
        color, marker = colors[i % len(colors)], markers[(i + i // 10) % len(markers)]
        label = mid + (f"  ({bits:.2f} b/w)" if _finite(bits) else "")
        ys = [m if (m > 0 or not log_y) else np.nan for m in ms]
        ax.plot(xs, ys, color=color, marker=marker, markersize=7, linewidth=2, label=label, zorder=3)
        if any(h > lo for lo, h in zip(los, his, strict=True)):
            lo_b = [max(v, min(positive) / 10) for v in los] if log_y else los
            ax.fill_between(xs, lo_b, his, color=color, alpha=0.18, linewidth=0, zorder=2)
    _context_axes(ax, lengths, log_y, "KL on the target tokens, nats")
    ax.set_title(f"Matched-target KL — {_run_title(run)}", fontsize=15, pad=26)
    targets = ", ".join(str(T) for T in sorted({s[2] for s in series if s[2] is not None})) or "?"
    n = max((s[7] for s in series), default=0)
    band = "90 % t-interval of the mean" if n >= 2 else "no band (one sample)"
    note = (
        f"target = each sample's last {targets} tokens, the same at every L; band = {band} over {n} samples"
    )
    ax.text(0.5, 1.015, note, transform=ax.transAxes, ha="center", va="bottom", fontsize=10.5, color="0.3")
    if with_legend:
        ax.legend(loc="best", fontsize=11, frameon=False)


def _context_axes(ax: Any, lengths: list[int], log_y: bool, ylabel: str) -> None:
    """Both KL panels' axes: context length on a log2 x axis ticked at the run's lengths; y linear from 0, or log
    with ticks at 1, 2, 5 × 10^k written as plain numbers (0.2, 0.5, 1, 2, 5, 10)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

    ax.set_xscale("log", base=2)
    if lengths:
        ax.xaxis.set_major_locator(FixedLocator(lengths))
        ax.set_xticklabels([str(L) for L in lengths])
        pad = 2**0.25
        ax.set_xlim(lengths[0] / pad, lengths[-1] * pad)
    ax.xaxis.set_minor_locator(NullLocator())
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="minor", axis="y", alpha=0.12)
    else:
        ax.set_ylim(bottom=0)
    ax.grid(True, which="major", alpha=0.35)
    ax.tick_params(labelsize=12)
    ax.set_xlabel("context length L (tokens, log2 scale)", fontsize=13)
    ax.set_ylabel(ylabel + ("  (log scale)" if log_y else ""), fontsize=13)


def render_anatomy_png(record: Mapping[str, Any]) -> bytes:
    """The error anatomy as PNG bytes: per method with one (a row), heatmaps of the relative error (log colour
    scale, shared by all panels) over decoder layer × log2 position bucket for the residual stream, keys and
    values."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    from lcc_harness.measure.anatomy import QUANTITIES, Anatomy, bucket_label

    found = [
        (mid, Anatomy.from_dict(a)) for mid, e in _methods(record).items() if (a := _anatomy(e)) is not None
    ]
    if not found:
        raise ValueError("no method in the record has an error anatomy")
    cols = [q for q in QUANTITIES if any(q in a.error for _, a in found)]
    vals = [
        v for _, a in found for q in cols for row in a.error.get(q, []) for v in row if _finite(v) and v > 0
    ]
    norm = LogNorm(vmin=min(vals), vmax=max(vals)) if vals else None
    title = {"residual": "residual stream", "k": "keys (k_proj)", "v": "values (v_proj)"}
    n_layers = max(a.layers for _, a in found)
    fig = Figure(
        figsize=(5.2 * len(cols) + 1.2, (1.2 + 0.16 * n_layers) * len(found) + 0.8),
        dpi=110,
        layout="constrained",
    )
    axes = fig.subplots(len(found), len(cols), squeeze=False)
    image = None
    for r, (mid, a) in enumerate(found):
        for c, q in enumerate(cols):
            ax = axes[r][c]
            m = np.array(a.error.get(q) or [[np.nan]], dtype=np.float64)  # (layers, buckets)
            m = np.where(m > 0, m, np.nan)  # zero error: blank on a log scale
            image = ax.imshow(
                m, aspect="auto", origin="lower", cmap="viridis", norm=norm, interpolation="nearest"
            )
            ax.set_xticks(range(len(a.buckets)))
            ax.set_xticklabels([bucket_label(lo, hi) for lo, hi in a.buckets], rotation=60, fontsize=8)
            ax.set_ylabel("decoder layer", fontsize=10)
            ax.set_title(f"{mid}: {title[q]}", fontsize=11)
            if r == len(found) - 1:
                ax.set_xlabel("position bucket (tokens)", fontsize=10)
    if image is not None and norm is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="relative error ‖x_cmp − x_ref‖ / ‖x_ref‖")
    run = record.get("run") or {}
    fig.suptitle(f"Error anatomy — {_run_title(run)}, length {found[0][1].length}", fontsize=13)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _probe_curves(
    record: Mapping[str, Any],
) -> list[tuple[str, list[int], list[float], list[float], list, list]]:
    """(method, lengths, window KL, key-token KL (None where n/a), copy KL, copy top-1 of the compressed model)
    of each method with probes."""
    out = []
    for mid, entry in _methods(record).items():
        p = entry.get("probes") if entry.get("status", "ok") in ("ok", "partial") else None
        curves = _curves(entry)
        if not isinstance(p, Mapping) or not curves:
            continue
        xs = sorted(L for L in curves if str(L) in (p.get("curves") or {}))
        cells = [p["curves"][str(L)] for L in xs]
        win = [curves[L].get("window_kl") for L in xs]
        key = [(c.get("keytokens") or {}).get("kl") for c in cells]
        cp = [(c.get("copy") or {}).get("kl") for c in cells]
        acc = [(c.get("copy") or {}).get("cmp_acc") for c in cells]
        out.append((mid, xs, win, key, cp, acc))
    return out


def render_probes_png(record: Mapping[str, Any]) -> bytes:
    """The long-range probes as PNG bytes: left, key-token KL (solid) beside window KL (dotted) per method vs
    context length; right, copy KL at a distance (n/a points, where the reference fails to copy, are left out)."""
    from matplotlib.figure import Figure

    series = _probe_curves(record)
    if not series:
        raise ValueError("no method in the record has probes")
    colors = [f"C{i}" for i in range(10)]
    fig = Figure(figsize=(16, 6.4), dpi=110, layout="constrained")
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    lengths = sorted({L for s in series for L in s[1]})
    vals1 = [v for s in series for v in s[2] + s[3] if _finite(v) and v > 0]
    vals2 = [v for s in series for v in s[4] if _finite(v) and v > 0]
    log1 = bool(vals1) and max(vals1) / min(vals1) > 10
    log2 = bool(vals2) and max(vals2) / min(vals2) > 10
    for i, (mid, xs, win, key, cp, _acc) in enumerate(series):
        c = colors[i % len(colors)]

        def ys(v: list, log: bool) -> list[float]:
            return [x if _finite(x) and (x > 0 or not log) else np.nan for x in v]

        ax1.plot(xs, ys(key, log1), color=c, marker="o", linewidth=2, label=f"{mid}: key tokens")
        ax1.plot(xs, ys(win, log1), color=c, linestyle=":", linewidth=1.6, label=f"{mid}: window")
        ax2.plot(xs, ys(cp, log2), color=c, marker="s", linewidth=2, label=mid)
    _context_axes(ax1, lengths, log1, "KL(P_ref ‖ P_cmp), nats")
    _context_axes(ax2, lengths, log2, "KL on the copied span, nats")
    run = record.get("run") or {}
    ax1.set_title(f"Key-token KL vs window KL — {_run_title(run)}", fontsize=14)
    ax2.set_title("Copy at a distance (repeat ends at L)", fontsize=14)
    ax1.legend(fontsize=9, frameon=False, ncol=2)
    ax2.legend(fontsize=9, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
