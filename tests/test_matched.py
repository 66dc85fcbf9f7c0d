"""Matched-target curves: the same last T tokens of each sample scored at every context length."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _tiny import TINY_LENGTHS, tiny_config

from lcc_harness.engines.results import MethodResult
from lcc_harness.engines.torch.harness import Harness
from lcc_harness.errors import LengthError
from lcc_harness.measure.growth import log_slope_contrast, matched_growth
from lcc_harness.measure.reference import reference_key
from lcc_harness.options import BY_KEY, OptionError, run_fields

# kv with blocks of 16 so that its quantization reaches the shortest length; w8a8's KL is ~1e-3
METHODS = ("rtn-w3-g32", "magnitude-s50", "w8a8", "kv-k4v4-g16", "random-s10")


@torch.no_grad()
def direct_matched_kl(ref_model, cmp_model, ids: torch.Tensor, L: int, T: int) -> float:
    """KL_i(L) the simple way: full logits of both models on ids[end−L:end], float64 log-softmax, KL(P_ref ‖ P_cmp)
    at the last T positions, mean over them."""
    x = ids[ids.shape[0] - L :].view(1, -1)
    lr = torch.log_softmax(ref_model(input_ids=x, use_cache=False).logits[0, -T:].double(), -1)  # (T, V)
    lc = torch.log_softmax(cmp_model(input_ids=x, use_cache=False).logits[0, -T:].double(), -1)
    return float((lr.exp() * (lr - lc)).sum(-1).mean())


@pytest.mark.parametrize("summary", [True, False], ids=["summary", "direct"])
def test_matched_equals_direct_per_length_computation(tiny, summary):
    h = Harness(tiny_config(design="matched", reference_summary=summary), lm=tiny)
    T = h.target
    assert h.target == TINY_LENGTHS[0] // 2
    worst_rel = worst_abs = 0.0
    for mid in METHODS:
        res = h.run(mid)
        assert res.mode == "matched" and not res.stats and res.matched is not None
        cmp_model, _, _ = h.compress(mid)  # the same deterministic compression, as a separate copy
        for L in TINY_LENGTHS:
            got = res.matched.stats[L].per_sample["window_kl"]
            want = [direct_matched_kl(tiny.model, cmp_model, s.ids, L, T) for s in h.samples]
            for g, w in zip(got, want, strict=True):
                assert w > 1e-4  # not a comparison of zeros
                # float32 log-softmax vs float64: ~1e-7 relative, and ~1e-7 nats absolute for a small KL
                assert abs(g - w) <= 1e-6 * w + 2e-7, (mid, L, g, w)
                worst_abs = max(worst_abs, abs(g - w))
                if w > 0.05:
                    worst_rel = max(worst_rel, abs(g - w) / w)
            assert res.matched.stats[L].window_kl == pytest.approx(np.mean(want), rel=1e-6, abs=2e-7)
        del cmp_model
    assert worst_rel <= 1e-6 and worst_abs <= 2e-7, (worst_rel, worst_abs)


def test_both_designs_reuse_the_longest_window_pass_exactly(tiny, monkeypatch):
    """With design both, the matched curve's longest length reuses the window measurement's last pass (the same
    ids through the same model): one forward fewer per sample, and the numbers of a matched-only run (whose
    reference is built by another path: equal to float rounding, ~1e-8 relative)."""
    import lcc_harness.engines.torch.curves as run_mod

    only = Harness(tiny_config(design="matched"), lm=tiny).run("rtn-w3-g32").matched
    both_h = Harness(tiny_config(design="both"), lm=tiny)
    _ = both_h.reference, both_h.matched_reference
    calls = []
    real = run_mod.final_hidden
    monkeypatch.setattr(run_mod, "final_hidden", lambda m, x: calls.append(x.shape[-1]) or real(m, x))
    both = both_h.run("rtn-w3-g32").matched
    Lmax, n = TINY_LENGTHS[-1], len(both_h.samples)
    assert calls.count(Lmax) == n  # the window pass only; the matched pass at Lmax was not repeated
    for L in TINY_LENGTHS:
        got, want = both.stats[L].per_sample["window_kl"], only.stats[L].per_sample["window_kl"]
        assert got == pytest.approx(want, rel=1e-6), L


def test_matched_targets_are_the_same_tokens(harness):
    """Every length scores the sample's last T tokens: the input at L ends where the sample ends."""
    from lcc_harness.measure.design import matched_ids

    s = harness.samples[0]
    T = harness.target
    targets = [matched_ids(s.ids, L)[-T:] for L in TINY_LENGTHS]
    assert all(torch.equal(t, s.ids[-T:]) for t in targets)
    assert [matched_ids(s.ids, L).shape[0] for L in TINY_LENGTHS] == list(TINY_LENGTHS)


def test_both_keeps_window_curves_identical(tiny):
    window = Harness(tiny_config(), lm=tiny).run("rtn-w3-g32")
    both = Harness(tiny_config(design="both", target_tokens=8), lm=tiny).run("rtn-w3-g32")
    assert window.matched is None and both.matched.target_tokens == 8
    assert {L: s.to_dict() for L, s in window.stats.items()} == {
        L: s.to_dict() for L, s in both.stats.items()
    }
    d = both.to_dict()
    assert set(d["matched"]) >= {"target_tokens", "curves", "growth"}
    back = MethodResult.from_dict(d)
    assert back.to_dict() == d
    assert "matched" not in window.to_dict()


def test_matched_reference_cached_with_its_own_key(tiny, cache_dir):
    cfg = tiny_config(design="both", use_cache=True, cache_dir=str(cache_dir))
    first = Harness(cfg, lm=tiny).run("rtn-w3-g32")
    again = Harness(cfg, lm=tiny).run("rtn-w3-g32")
    assert not first.timings["matched_reference_cache_hit"] and again.timings["matched_reference_cache_hit"]
    for L in TINY_LENGTHS:
        assert again.matched.stats[L].to_dict() == first.matched.stats[L].to_dict()
    names = sorted(p.name.split("-")[0] for p in cache_dir.glob("*.safetensors"))
    assert names == ["mref", "ref"]
    h = Harness(cfg, lm=tiny)
    args = (tiny, h.samples, h.lengths, True)
    assert reference_key(*args, target=None) == reference_key(*args)  # the window key did not change
    assert len({reference_key(*args), reference_key(*args, target=8), reference_key(*args, target=16)}) == 3


def test_identity_matched_is_zero_and_growth_na(tiny):
    res = Harness(tiny_config(design="matched"), lm=tiny).run("none")
    for s in res.matched.stats.values():
        assert abs(s.window_kl) < 1e-6 and s.top1 == 1.0
    assert res.matched.growth["slope"] is None and res.matched.growth["na"]


def test_target_and_design_validation(tiny):
    with pytest.raises(LengthError, match="--target-tokens 64 must lie in"):
        Harness(tiny_config(design="matched", target_tokens=64), lm=tiny)
    assert run_fields({"design": "Both", "target-tokens": "12"}) == {"design": "both", "target_tokens": 12}
    with pytest.raises(OptionError, match="--design 'slid' is not one of window, matched, both"):
        run_fields({"design": "slid"})
    assert BY_KEY["design"].where == "both" and BY_KEY["target-tokens"].where == "both"


def test_matched_growth_recovers_power_law():
    lengths = [32, 64, 128, 256]
    b = [0.5, 0.3, -0.2]
    per = {L: [0.01 * (i + 1) * L**bi for i, bi in enumerate(b)] for L in lengths}
    g = matched_growth(per, lengths)
    assert g.per_sample == pytest.approx(b, abs=1e-12)
    assert g.slope == pytest.approx(np.mean(b)) and g.per_doubling == pytest.approx(2 ** np.mean(b))
    assert g.ci[0] < g.slope < g.ci[1] and g.n == 3
    c = log_slope_contrast(per, {L: [v * 2 for v in vs] for L, vs in per.items()}, lengths)
    assert c.mean == pytest.approx(0.0, abs=1e-12)  # a constant factor has no slope
    one = matched_growth({32: [0.1], 64: [0.2]}, [32, 64])
    assert one.slope == pytest.approx(1.0) and one.ci == (None, None)
    zero = matched_growth({32: [0.0, 0.1], 64: [0.1, 0.1]}, [32, 64])
    assert zero.slope is None and "≤" in zero.na
    assert math.isfinite(zero.ratio)


def _with_matched(record: dict, result: MethodResult) -> dict:
    """`record` (test_report's) with `result`'s matched curves on its first method."""
    import copy

    rec = copy.deepcopy(record)
    rec["methods"]["rtn-w3-g128"]["matched"] = result.matched.to_dict()
    return rec


@pytest.fixture(scope="module")
def both_result(tiny) -> MethodResult:
    return Harness(tiny_config(design="both", samples=3), lm=tiny).run("rtn-w3-g32")


def test_record_report_and_png_carry_matched_curves(both_result, tmp_path):
    from test_report import make_record

    from lcc_harness.record import MethodOutcome, RunRecord
    from lcc_harness.report import render_markdown, write_reports

    rec = _with_matched(make_record(), both_result)
    md = render_markdown(rec)
    assert "## Matched-target curves" in md and "### Growth of the matched curves" in md
    g = both_result.matched.growth
    assert f"{g['slope']:+.3f}" in md and f"[{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]" in md
    out = MethodOutcome.from_dict(rec["methods"]["rtn-w3-g128"])
    assert out.matched == both_result.matched.to_dict()
    back = RunRecord.from_dict(RunRecord(run=rec["run"], methods={"m": out}).to_dict())
    assert back.methods["m"].matched == out.matched
    paths = write_reports(rec, tmp_path)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a record without matched data renders as before: no matched section
    assert "Matched-target" not in render_markdown(make_record())


def test_matched_only_record_renders(both_result, tmp_path):
    from lcc_harness.report import render_markdown, write_reports

    rec = {
        "run": {
            "model": "tiny-llama",
            "lengths": list(TINY_LENGTHS),
            "design": "matched",
            "target_tokens": 16,
        },
        "methods": {"rtn-w3-g32": {"status": "ok", "curves": {}, "matched": both_result.matched.to_dict()}},
    }
    md = render_markdown(rec)
    assert "## Matched-target curves" in md and "matched, T = 16" in md
    assert write_reports(rec, tmp_path)[2].stat().st_size > 1000


@pytest.mark.slow
def test_plugin_design_both_and_matched(project):
    import json

    def run(*args: str) -> pytest.RunResult:
        return project.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-rfEs", *args)

    r = run(
        "--lcc-methods",
        "rtn-w3-g32",
        "--lcc-design",
        "both",
        "--lcc-update-baselines",
        "test_kl_regression.py",
    )
    r.assert_outcomes(passed=4)
    rec = json.loads((project.path / "reports" / "kl_report.json").read_text())
    entry = rec["methods"]["rtn-w3-g32"]
    assert entry["matched"]["target_tokens"] == 32 and sorted(map(int, entry["matched"]["curves"])) == [
        64,
        128,
        256,
    ]
    assert (
        rec["run"]["design"] == "both"
        and "## Matched-target curves" in (project.path / "reports" / "kl_report.md").read_text()
    )
    stored = (project.path / "baselines" / "tiny-llama.float32.cpu.smoke.json").read_text()
    assert "matched" not in stored  # baselines keep window curves only

    r = run(
        "--lcc-methods",
        "rtn-w3-g32",
        "--lcc-design",
        "matched",
        "--lcc-target-tokens",
        "16",
        "test_kl_regression.py",
    )
    r.assert_outcomes(skipped=4)
    r.stdout.fnmatch_lines(["*reads window curves, and --lcc-design matched measures none*"])
    rec = json.loads((project.path / "reports" / "kl_report.json").read_text())
    assert rec["methods"]["rtn-w3-g32"]["matched"]["target_tokens"] == 16


def test_matched_cost_bench_counts_forwards(monkeypatch, capsys):
    """bench/matched_cost.py on the tiny model: the matched design passes Σ L / Lmax forwards per sample (the
    reference from the cache), the window design one (plus the 1-sample length probe)."""
    import json
    import sys

    from bench import matched_cost

    argv = ["matched_cost", "--lengths", "32,64,128", "--methods", "rtn-w3-g32", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    matched_cost.main()
    out = json.loads(capsys.readouterr().out)
    row = out["methods"]["rtn-w3-g32"]
    assert row["matched"]["forwards_tokens"] == pytest.approx((32 + 64 + 128) / 128)
    assert row["matched"]["forwards_tokens"] <= 2.1
    assert row["window"]["forwards_tokens"] == pytest.approx(1 + 32 / (2 * 128))
