"""The informational statistics beside forward KL: reverse KL, Δp of the true next token, top-1 with its standard
error. Checked against a float64 computation from full logits, on both measure paths, and on the identity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _tiny import TINY_LENGTHS, tiny_config

from lcc_harness.engines.torch.harness import Harness
from lcc_harness.measure.head import (
    compare_summary,
    final_hidden,
    linear_head,
    output_head,
    summarize_reference,
)
from lcc_harness.measure.kl import DP_QUANTILES, PositionStats, compare, summarize


@pytest.fixture(scope="module")
def harness(tiny) -> Harness:
    """A harness that computes reverse KL (RunConfig.reverse_kl; off by default)."""
    return Harness(tiny_config(reverse_kl=True), lm=tiny)


STAT_KEYS = ("reverse_kl", "top1_se", "dp_mean", "dp_rms", "dp_p01", "dp_p05", "dp_p50", "dp_p95", "dp_p99")


def float64_stats(tiny, model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse KL (T,) and Δp (T-1,) straight from both models' full logits in float64."""
    h_ref, h_cmp = final_hidden(tiny.model, ids), final_hidden(model, ids)
    lr = torch.log_softmax(tiny.model.lm_head(h_ref).double(), -1)  # (T, V)
    lc = torch.log_softmax(model.lm_head(h_cmp).double(), -1)
    rkl = (lc.exp() * (lc - lr)).sum(-1)
    nxt = ids[1:, None]
    dp = lc[:-1].gather(1, nxt).squeeze(1).exp() - lr[:-1].gather(1, nxt).squeeze(1).exp()
    return rkl, dp


@pytest.mark.parametrize("path", ["direct", "summary"])
@pytest.mark.parametrize("chunk", [5, 256])
def test_reverse_kl_and_dp_match_float64(harness, tiny, path, chunk):
    model, _, _ = harness.compress("rtn-w3-g32")
    ids = harness.samples[0].ids
    h_ref, h_cmp = final_hidden(tiny.model, ids), final_hidden(model, ids)
    if path == "direct":
        st = compare(output_head(tiny.model), output_head(model), h_ref, h_cmp, ids, chunk, reverse=True)
    else:
        summ = summarize_reference(tiny.model, h_ref, ids, chunk)
        st = compare_summary(summ, output_head(model), h_ref, h_cmp, ids, linear_head(model))
    rkl64, dp64 = float64_stats(tiny, model, ids)
    assert float(rkl64.mean()) > 1e-3 and float(dp64.abs().mean()) > 1e-4  # not a comparison between zeros
    torch.testing.assert_close(st.rkl.double(), rkl64, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(st.dp.double(), dp64, atol=1e-6, rtol=1e-4)
    assert st.rkl.min() >= -1e-6
    assert not torch.allclose(st.rkl, st.kl, atol=1e-4)  # the other direction, not a copy


def test_summary_without_the_compared_head_leaves_reverse_kl_out(harness, tiny):
    model, _, _ = harness.compress("rtn-w3-g32")
    ids = harness.samples[0].ids
    h_ref = final_hidden(tiny.model, ids)
    summ = summarize_reference(tiny.model, h_ref, ids)
    st = compare_summary(summ, output_head(model), h_ref, final_hidden(model, ids), ids)
    assert st.rkl is None and st.dp is not None
    s = summarize(64, [st])
    assert s.reverse_kl is None and "reverse_kl" not in s.per_sample and s.dp_mean is not None


def test_length_stats_from_the_harness_match_float64(tiny):
    """Harness.run on both paths: window means of reverse KL and Δp, Δp RMS and percentiles, top-1 ± SE."""
    L = TINY_LENGTHS[-1]
    for summary in (True, False):
        h = Harness(tiny_config(reference_summary=summary, reverse_kl=True), lm=tiny)
        res = h.run("rtn-w3-g32")
        model, _, _ = h.compress("rtn-w3-g32")
        rk, dps = zip(*(float64_stats(tiny, model, s.ids[:L]) for s in h.samples), strict=True)
        win_rkl = torch.cat([r[L // 2 : L] for r in rk])
        win_dp = torch.cat([d[L // 2 : L - 1] for d in dps])
        s = res.stats[L]
        assert s.reverse_kl == pytest.approx(float(win_rkl.mean()), rel=1e-4)
        assert s.per_sample["reverse_kl"] == pytest.approx(
            [float(r[L // 2 : L].mean()) for r in rk], rel=1e-4
        )
        assert s.dp_mean == pytest.approx(float(win_dp.mean()), rel=1e-4, abs=1e-7)
        assert s.dp_rms == pytest.approx(float(win_dp.square().mean().sqrt()), rel=1e-4)
        want_q = np.quantile(win_dp.numpy(), DP_QUANTILES)
        got_q = [s.dp_p01, s.dp_p05, s.dp_p50, s.dp_p95, s.dp_p99]
        assert got_q == pytest.approx(list(want_q), rel=1e-3, abs=1e-6)
        n = len(h.samples) * (L - L // 2)
        assert s.top1_se == pytest.approx(math.sqrt(s.top1 * (1 - s.top1) / n), rel=1e-12)
        assert 0 < s.top1 < 1 and s.top1_se > 0


@pytest.mark.parametrize("summary", [True, False], ids=["summary", "direct"])
def test_identity_gives_zero_reverse_kl_zero_dp_and_full_agreement(tiny, summary):
    res = Harness(tiny_config(reference_summary=summary, reverse_kl=True), lm=tiny).run("none")
    for s in res.stats.values():
        assert s.reverse_kl == 0.0 and s.top1 == 1.0 and s.top1_se == 0.0
        assert s.dp_mean == 0.0 and s.dp_rms == 0.0
        assert [s.dp_p01, s.dp_p05, s.dp_p50, s.dp_p95, s.dp_p99] == [0.0] * 5


def test_summarize_windows_the_new_statistics():
    kl = torch.arange(8, dtype=torch.float32)
    rkl = 2 * kl
    dp = torch.tensor([0.0, 0, 0, 0, -0.4, 0.2, 0.2])  # (T-1,): the window of L=8 is indices 4..6
    st = PositionStats(kl, torch.tensor([True] * 6 + [False] * 2), torch.ones(7), rkl, dp)
    s = summarize(8, [st])
    assert s.reverse_kl == pytest.approx(2 * (4 + 5 + 6 + 7) / 4)
    assert s.dp_mean == pytest.approx(0.0, abs=1e-8)
    assert s.dp_rms == pytest.approx(math.sqrt((0.16 + 0.04 + 0.04) / 3))
    assert s.dp_p50 == pytest.approx(0.2, rel=1e-6) and s.dp_p01 == pytest.approx(-0.4 + 0.02 * 0.6, rel=1e-6)
    assert s.top1 == 0.5 and s.top1_se == pytest.approx(math.sqrt(0.25 / 4))
    old = summarize(8, [PositionStats(kl, st.top1, st.dnll)])  # a caller that computes neither
    assert old.reverse_kl is None and old.dp_mean is None and old.top1_se is not None


def test_new_statistics_reach_the_json_form(harness):
    d = harness.run("rtn-w3-g32").to_dict()
    curve = d["curves"][str(TINY_LENGTHS[0])]
    for key in STAT_KEYS:
        assert isinstance(curve[key], float), key
    assert set(curve["per_sample"]) >= {"window_kl", "reverse_kl", "dp_mean"}


# ---- front ends: the Markdown report and `lcc measure` -------------------------------------------------------
def _record_with(curves: dict) -> dict:
    return {
        "run": {"model": "tiny-llama", "dtype": "float32", "device_type": "cpu", "lengths": [32, 64]},
        "methods": {"rtn-w3-g32": {"status": "ok", "curves": curves, "method_info": {}}},
    }


def test_markdown_shows_reverse_kl_top1_se_and_dp(harness):
    from lcc_harness.report import render_markdown

    res = harness.run("rtn-w3-g32")
    curves = {str(L): s.to_dict() for L, s in res.stats.items()}
    md = render_markdown(_record_with(curves))
    top = max(res.stats)
    s = res.stats[top]
    rev = md.split("## Reverse KL")[1].split("\n## ")[0]
    assert f"{s.reverse_kl:.4f}" in rev
    top1 = md.split("## Top-1")[1].split("\n## ")[0]
    assert f"{100 * s.top1:.2f} ± {100 * s.top1_se:.2f} %" in top1
    dp = md.split("## Δp")[1].split("\n## ")[0]
    row = next(x for x in dp.splitlines() if x.startswith("| rtn-w3-g32"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert (
        cells[1] == str(top)
        and cells[2] == f"{100 * s.dp_mean:+.3f} %"
        and cells[3] == f"{100 * s.dp_rms:.3f} %"
    )
    assert cells[8] == f"{100 * s.dp_p99:+.3f} %"


def test_markdown_of_a_record_without_the_new_statistics():
    """Records written before these statistics existed still render: dashes, and no Δp rows."""
    from lcc_harness.report import render_markdown

    old = {"length": 32, "window_kl": 0.3, "cumulative_kl": 0.3, "p50": 0.1, "p90": 0.5, "p99": 0.8, "max": 1.0,
           "top1": 0.5, "dnll": 0.01, "per_sample": {"window_kl": [0.3]}}  # fmt: skip
    md = render_markdown(_record_with({"32": old}))
    assert (
        "_Not computed in this run; pass `--lcc-reverse-kl`" in md.split("## Reverse KL")[1].split("\n## ")[0]
    )
    assert "50.00 %" in md.split("## Top-1")[1].split("\n## ")[0]
    assert "_No Δp statistics in this record._" in md


def test_lcc_measure_prints_the_new_statistics(capsys):
    from lcc_harness.cli import main

    rc = main(["measure", "--model", "tiny-llama", "--method", "rtn-w3-g32", "--lengths", "32,64", "--samples",
               "1", "--device", "cpu", "--quiet", "--no-cache", "--reverse-kl"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    header = next(x for x in out.splitlines() if x.startswith("|   length"))
    assert "top-1 SE" in header and "reverse KL" in header
    assert "Δp = p_cmp − p_ref of the actual next token" in out
    assert "mean Δp" in out and "RMS Δp" in out and "Δp 99 %" in out


# ---- reverse KL only on request (RunConfig.reverse_kl, --reverse-kl / --lcc-reverse-kl) ----------------------
@pytest.mark.parametrize("summary", [True, False], ids=["summary", "direct"])
def test_reverse_kl_is_off_by_default_and_changes_nothing_else(tiny, summary):
    """Off: no reverse KL anywhere (window and matched curves); every other statistic is bit-identical to a run
    that computes it."""
    cfg = dict(reference_summary=summary, design="both", target_tokens=16)
    off = Harness(tiny_config(**cfg), lm=tiny).run("rtn-w3-g32")
    on = Harness(tiny_config(**cfg, reverse_kl=True), lm=tiny).run("rtn-w3-g32")
    for a, b in ((off.stats, on.stats), (off.matched.stats, on.matched.stats)):
        assert set(a) == set(b) and a
        for L in a:
            assert a[L].reverse_kl is None and "reverse_kl" not in a[L].per_sample
            assert b[L].reverse_kl is not None and b[L].reverse_kl > 0
            da, db = a[L].to_dict(), b[L].to_dict()
            db.pop("reverse_kl"), db["per_sample"].pop("reverse_kl"), da.pop("reverse_kl")
            assert da == db


def test_lcc_measure_without_reverse_kl_has_no_such_column(capsys):
    from lcc_harness.cli import main

    rc = main(["measure", "--model", "tiny-llama", "--method", "rtn-w3-g32", "--lengths", "32,64", "--samples",
               "1", "--device", "cpu", "--quiet", "--no-cache"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    header = next(x for x in out.splitlines() if x.startswith("|   length"))
    assert "top-1 SE" in header and "reverse KL" not in header
