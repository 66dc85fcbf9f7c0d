"""Reports of a run record: Markdown tables, JSON round trip, the PNG, terminal summary, writability checks."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch

from lcc_harness.errors import HarnessError
from lcc_harness.report import (
    REPORT_JSON,
    REPORT_MD,
    REPORT_PNG,
    check_writable,
    fmt_kl,
    fmt_signed,
    render_markdown,
    terminal_summary,
    write_reports,
)
from lcc_harness.report.plot import mean_band

LENGTHS = [256, 512, 1024, 2048]
ERROR_MSG = "MethodError: gptq needs calibration data but --lcc-calib-samples is 0"


def _curve(base: float, growth: float, n: int, rng: np.random.Generator) -> dict:
    """Curves of one method: window KL = base · (1 + growth)^i with lognormal sample noise."""
    out = {}
    for i, L in enumerate(LENGTHS):
        ps = [float(v) for v in base * (1 + growth) ** i * np.exp(rng.normal(0, 0.1, n))]
        w = float(np.mean(ps))
        out[str(L)] = {
            "length": L, "window_kl": w, "cumulative_kl": 0.9 * w, "p50": 0.4 * w, "p90": 2 * w,
            "p99": 8 * w, "max": 40 * w, "top1": 1 - 2 * w, "dnll": 0.6 * w,
            "per_sample": {"window_kl": ps, "cumulative_kl": [0.9 * p for p in ps],
                           "top1": [1 - 2 * p for p in ps], "dnll": [0.6 * p for p in ps]},
        }  # fmt: skip
    return out


def make_record(samples: int = 4) -> dict:
    """3 methods × 4 lengths: rtn (one failing check), wanda (ok, one 'better'), gptq (errored)."""
    rng = np.random.default_rng(0)
    rtn, wanda = _curve(0.08, 0.12, samples, rng), _curve(4e-4, 0.0, samples, rng)
    base = {"rtn-w3-g128": 0.08, "wanda-s50": 4e-4}
    baselines = {
        m: {"curves": {str(L): {"window_kl": b * (1.12**i if m == "rtn-w3-g128" else 1.0), "tolerance": 0.1}
                       for i, L in enumerate(LENGTHS)}, "growth": None}
        for m, b in base.items()
    }  # fmt: skip
    checks = []
    for m, curves in (("rtn-w3-g128", rtn), ("wanda-s50", wanda)):
        for L in LENGTHS:
            v, b = curves[str(L)]["window_kl"], baselines[m]["curves"][str(L)]["window_kl"]
            checks.append({"method": m, "length": L, "kind": "kl", "value": v, "baseline": b, "tolerance": 0.1,
                           "outcome": "pass"})  # fmt: skip
    rtn["2048"]["window_kl"] *= 1.5  # a regression at the longest length
    rtn["2048"]["per_sample"]["window_kl"] = [1.5 * p for p in rtn["2048"]["per_sample"]["window_kl"]]
    checks[3].update(value=rtn["2048"]["window_kl"], outcome="fail")
    checks[6].update(outcome="better")  # wanda-s50 @ 1024
    checks.append({"method": "rtn-w3-g128", "length": None, "kind": "growth", "value": 1.9, "baseline": 1.4,
                   "tolerance": None, "outcome": "pass"})  # fmt: skip
    return {
        "run": {
            "model": "smollm2-135m", "dtype": "float32", "device_type": "cpu", "profile": "default",
            "lengths": LENGTHS, "samples": samples, "corpus": "python-reference", "corpus_sha256": "0f" * 32,
            "seed": 0, "mode": "one-pass",
            "versions": {"torch": "2.13.0", "transformers": "5.24.0", "harness": "0.1.0"},
            "started": "2025-06-01T12:00:00+00:00", "finished": "2025-06-01T12:09:41+00:00",
            "baseline_file": "baselines/smollm2-135m-float32-cpu.json", "update": False,
        },
        "methods": {
            "rtn-w3-g128": {"status": "ok", "error": "", "curves": rtn,
                            "timings": {"reference_s": 20.1, "compression_s": 1.2, "measurement_s": 31.0},
                            "method_info": {"effective_bits": 3.125}},
            "wanda-s50": {"status": "ok", "error": "", "curves": wanda,
                          "timings": {"reference_s": 0.0, "compression_s": 6.5, "measurement_s": 30.2},
                          "method_info": {}},
            "gptq-w3-g128": {"status": "error", "error": ERROR_MSG, "curves": {},
                             "timings": {"reference_s": 0.0, "compression_s": 0.0, "measurement_s": 0.0},
                             "method_info": {}},
        },
        "checks": checks,
        "growth": {
            "rtn-w3-g128": {"ratio": 1.9, "rel_slope": 0.21, "ci": [0.15, 0.27], "verdict": "rising",
                            "baseline_verdict": "rising"},
            "wanda-s50": {"ratio": 1.01, "rel_slope": 0.004, "ci": [-0.03, 0.04], "verdict": "flat",
                          "baseline_verdict": None},
        },
        "baselines": baselines,
        "findings": [
            {"claim": "pruning-flat", "title": "Pruning (magnitude, Wanda) stays flat as context grows",
             "paper": "flat", "measured": "wanda-s50: flat", "holds": "yes",
             "detail": "wanda-s50: rel. slope +0.004/doubling (90 % CI −0.03..+0.04).", "stored": None,
             "reproduced": None},
            {"claim": "quant-rises", "title": "Low-bit weight quantization degrades with context",
             "paper": "rising", "measured": "rtn-w3-g128: rising", "holds": "inconclusive",
             "detail": "rtn-w3-g128 rises 21 % per doubling, but gptq-w3-g128 did not run.", "stored": "no",
             "reproduced": False},
        ],
        "baseline_changes": [],
    }  # fmt: skip


@pytest.fixture(scope="module")
def record() -> dict:
    return make_record()


@pytest.fixture(scope="module")
def written(record, tmp_path_factory):
    """Reports written once for the module (rendering the PNG takes about a second); tests only read them."""
    out = tmp_path_factory.mktemp("run") / "reports" / "nested"
    return out, write_reports(copy.deepcopy(record), out)


def test_write_reports_writes_three_files_and_creates_dir(written):
    out, paths = written
    assert [p.name for p in paths] == [REPORT_JSON, REPORT_MD, REPORT_PNG]
    assert all(p.parent == out and p.is_file() and p.stat().st_size > 0 for p in paths)
    assert sorted(os.listdir(out)) == sorted(p.name for p in paths)  # no temp files left behind


def test_json_is_the_record(written, record):
    out, _ = written
    text = (out / REPORT_JSON).read_text()
    assert json.loads(text) == record
    assert text == json.dumps(record, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def test_markdown_names_every_method_length_and_error(written, record):
    md = (written[0] / REPORT_MD).read_text()
    for m in record["methods"]:
        assert m in md
    for L in LENGTHS:
        assert f"| {L} " in md or f" {L} |" in md
    assert ERROR_MSG in md
    assert "## Errors" in md and "`gptq-w3-g128` (error)" in md
    assert "KL(P_ref ‖ P_cmp)" in md and "(L/2, L]" in md and "[0, L)" in md
    for section in ("Window KL", "Cumulative KL", "p99", "Top-1", "ΔNLL", "Growth", "Baseline checks"):
        assert f"## {section}" in md
    assert "smollm2-135m" in md and "0f" * 32 in md and "2.13.0" in md and "9.7 min" in md


def _rows(md: str, section: str) -> list[list[str]]:
    """Body rows of the first Markdown table under `## {section}`, as stripped cells."""
    body = md.split(f"## {section}")[1].split("\n## ")[0]
    lines = [x for x in body.splitlines() if x.startswith("|")][2:]  # drop header and |---| rule
    return [[c.strip() for c in x.strip().strip("|").split("|")] for x in lines]


def test_markdown_marks_the_failing_check_and_only_it(written):
    md = (written[0] / REPORT_MD).read_text()
    rows = _rows(md, "Baseline checks")
    assert len(rows) == 9
    failing = [r for r in rows if "❌" in r[-1]]
    assert len(failing) == 1
    method, length, kind, value, baseline, delta, tol, worse, _ = failing[0]
    assert (method, length, kind, tol) == ("rtn-w3-g128", "2048", "kl", "0.1000")
    assert worse == "—"  # this synthetic record has no per-sample pairing
    assert delta.startswith("+") and float(delta.split()[0]) > 10  # Δ % against the baseline
    assert sum(r[-1] == "⬇ better" for r in rows) == 1
    assert sum(r[-1] == "✅ pass" for r in rows) == 7
    assert [r[1] for r in rows if r[2] == "growth"] == ["—"]
    summary = md.split("## Summary")[1].split("\n## ")[0]
    assert "**FAILED**" in summary and "`rtn-w3-g128` @ 2048 window KL" in summary


def test_markdown_states_each_finding(written, record):
    md = (written[0] / REPORT_MD).read_text()
    findings = md.split("## Paper findings on this model")[1].split("\n## ")[0]
    for f in record["findings"]:
        block = findings.split(f"### {f['claim']}")[1].split("\n### ")[0]
        holds = next(x for x in block.splitlines() if "Holds on smollm2-135m:" in x)
        assert holds.endswith(f" {f['holds']}**")
        assert f["detail"] in block and f["measured"] in block


def test_markdown_number_formats(written, record):
    md = (written[0] / REPORT_MD).read_text()
    window = {r[0]: r[1:] for r in _rows(md, "Window KL")}
    assert set(window) == {"rtn-w3-g128", "wanda-s50", "gptq-w3-g128 (error)"}
    assert all(c.endswith("e-04") for c in window["wanda-s50"][1:])  # KL below 1e-3 in e-notation
    rtn = record["methods"]["rtn-w3-g128"]["curves"]
    assert window["rtn-w3-g128"] == ["3.12"] + [fmt_kl(rtn[str(L)]["window_kl"]) for L in LENGTHS]
    assert window["gptq-w3-g128 (error)"] == ["—"] * 5
    top1 = {r[0]: r[1:] for r in _rows(md, "Top-1")}
    assert top1["rtn-w3-g128"][0] == f"{100 * rtn['256']['top1']:.2f} %"
    dnll = {r[0]: r[1:] for r in _rows(md, "ΔNLL")}
    assert all(c.startswith("+") for c in dnll["rtn-w3-g128"])


def test_png_is_a_readable_image(written):
    import matplotlib.image as mpimg

    png = written[0] / REPORT_PNG
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(png)
    h, w = img.shape[:2]
    assert w >= 800 and 400 <= h <= 3000
    assert float(img[..., :3].std()) > 0.05  # not a blank canvas


def test_reports_survive_a_run_where_nothing_completed(tmp_path):
    rec = make_record()
    rec["methods"] = {"gptq-w3-g128": rec["methods"]["gptq-w3-g128"]}
    rec.update(checks=[], growth={}, findings=[], baselines={})
    paths = write_reports(rec, tmp_path)
    assert all(p.is_file() for p in paths)
    assert ERROR_MSG in paths[1].read_text()
    assert "ERROR" in terminal_summary(rec)


def test_rewrite_replaces_files(record, tmp_path):
    out = tmp_path
    write_reports(record, out)
    rec = copy.deepcopy(record)
    rec["run"]["model"] = "other-model"
    write_reports(rec, out)
    assert json.loads((out / REPORT_JSON).read_text())["run"]["model"] == "other-model"
    assert "other-model" in (out / REPORT_MD).read_text()
    assert len(os.listdir(out)) == 3


def test_terminal_summary_is_short_and_ascii(record):
    text = terminal_summary(record)
    lines = text.splitlines()
    assert len(lines) <= 10 and max(len(x) for x in lines) <= 110
    text.encode("ascii")  # safe for any terminal encoding
    rtn = next(x for x in lines if x.startswith("rtn-w3-g128"))
    assert "1 FAIL" in rtn and "4 pass" in rtn and "rising" in rtn and "1.9x" in rtn
    assert fmt_kl(record["methods"]["rtn-w3-g128"]["curves"]["2048"]["window_kl"]) in rtn
    assert "1 better" in next(x for x in lines if x.startswith("wanda-s50"))
    assert "ERROR" in next(x for x in lines if x.startswith("gptq-w3-g128"))
    assert any("needs calibration" in x for x in lines)


@pytest.mark.parametrize(
    ("x", "want"),
    [(0.012345, "0.01235"), (0.1, "0.1000"), (1.5, "1.500"), (12.3456, "12.35"), (4.2e-4, "4.200e-04"),
     (0.0, "0"), (None, "—"), (float("nan"), "nan"), (float("inf"), "inf")],
)  # fmt: skip
def test_fmt_kl_four_significant_digits(x, want):
    assert fmt_kl(x) == want


def test_fmt_signed():
    assert fmt_signed(0.0123) == "+0.01230" and fmt_signed(-2e-4) == "-2.000e-04"
    assert fmt_signed(float("nan")) == "nan"


def test_mean_band_is_the_findings_t_interval():
    vals = [0.10, 0.12, 0.08, 0.11, 0.09, 0.13]
    m, lo, hi = mean_band(vals)
    half = 2.015048 * np.std(vals, ddof=1) / math.sqrt(len(vals))  # t(0.95, df 5)
    assert (m, lo, hi) == pytest.approx((np.mean(vals), np.mean(vals) - half, np.mean(vals) + half), rel=1e-5)
    m2, lo2, hi2 = mean_band([0.1, 0.2, float("nan")])  # NaN dropped; n = 2 → t(0.95, df 1) = 6.3138
    se = np.std([0.1, 0.2], ddof=1) / math.sqrt(2)
    assert (lo2, hi2) == pytest.approx((m2 - 6.313752 * se, m2 + 6.313752 * se), rel=1e-5)
    assert mean_band([0.3]) == (0.3, 0.3, 0.3)
    assert all(math.isnan(v) for v in mean_band([float("nan")]))


def test_markdown_does_not_crash_on_missing_lengths(record):
    rec = copy.deepcopy(record)
    del rec["methods"]["wanda-s50"]["curves"]["1024"]
    md = render_markdown(rec)
    wanda = next(r for r in md.split("## Window KL")[1].splitlines() if r.startswith("| wanda-s50"))
    assert "—" in wanda


def test_check_writable_creates_dir_and_leaves_nothing(tmp_path):
    out = check_writable(tmp_path / "a" / "b")
    assert out.is_dir() and os.listdir(out) == []


def _unwritable_dir(tmp_path):
    """A directory this process cannot write: read-only, or (as root) a path under a regular file."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        (ro / "probe").write_text("x")
    except OSError:
        return ro / "reports"
    (ro / "probe").unlink()  # root ignores permissions: use a path under a regular file instead
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    return blocker / "reports"


def test_check_writable_rejects_unwritable_dir(tmp_path):
    target = _unwritable_dir(tmp_path)
    try:
        with pytest.raises(HarnessError) as ei:
            check_writable(target)
        msg = str(ei.value)
        assert f"report directory '{target}' is not writable" in msg and "--lcc-report-dir" in msg
        with pytest.raises(OSError, match="is not writable"):
            write_reports(make_record(), target)
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_run_record_round_trips_and_merges():
    from lcc_harness.record import RECORD_SCHEMA, MethodOutcome, RunRecord

    a = RunRecord(run={"model": "m"}, methods={"x": MethodOutcome("ok", curves={"64": {"window_kl": 0.1}})})
    a.checks.append({"method": "x", "length": 64, "kind": "kl", "outcome": "pass"})
    b = RunRecord(run={"model": "m"}, methods={"y": MethodOutcome("error", "boom")}, identity={"model": "m"})
    b.entries["y"] = {}
    d = json.loads(json.dumps(a.to_dict()))
    assert d["schema"] == RECORD_SCHEMA and RunRecord.from_dict(d) == a
    merged = RunRecord.merge([a, b])
    assert set(merged.methods) == {"x", "y"} and merged.identity == {"model": "m"} and len(merged.checks) == 1
    pub = merged.public()
    assert "entries" not in pub and pub["methods"]["y"] == {"status": "error", "error": "boom"}
    with pytest.raises(ValueError, match="schema"):
        RunRecord.from_dict({"run": {}})


def test_markdown_warns_when_a_method_zeroed_a_super_weight(record):
    from lcc_harness.methods._outliers import OutlierTally, changed_outliers

    rec = copy.deepcopy(record)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    w[5, 7] = 30 * float(w.std())
    after = w.clone()
    after[5, 7] = 0
    tally = OutlierTally()
    tally.add(1, changed_outliers("model.layers.11.mlp.down_proj", w, after))
    tally.record(rec["methods"]["rtn-w3-g128"]["method_info"])
    OutlierTally().record(rec["methods"]["wanda-s50"]["method_info"])  # changed nothing
    md = render_markdown(rec)
    warnings = md.split("## Warnings")[1].split("\n## ")[0]
    assert "`rtn-w3-g128` zeroed 1 super weight(s)" in warnings
    assert "`model.layers.11.mlp.down_proj[5, 7]`" in warnings and "→ +0" in warnings
    assert "wanda-s50" not in warnings
    table = md.split("## Outlier weights changed")[1].split("\n## ")[0]
    assert "| rtn-w3-g128" in table and "| wanda-s50" in table and "gptq" not in table
    assert "super zeroed" in table and "> 10σ" in table
    assert "## Warnings" not in render_markdown(record)  # nothing recorded, nothing to warn about


# ---- the summary that opens the report ----------------------------------------------------------------------


def _summary(md: str) -> str:
    return md.split("## How to read this report")[0]


def test_report_opens_with_a_short_summary_holding_every_gate_and_verdict(record):
    md = render_markdown(record)
    head = _summary(md)
    assert md.startswith("# Long-context KL report — smollm2-135m (float32, cpu)\n")
    assert len(head.rstrip("\n").splitlines()) <= 40
    assert md.index("## Summary") < md.index("## How to read") < md.index("## Window KL")
    rows = {r[0].strip("`"): r for r in _rows(head, "Summary")}
    assert set(rows) == set(record["methods"])
    method, gate, worst, kl, baseline, change = rows["rtn-w3-g128"]
    assert gate == "❌ fail" and worst == "2048"  # the failing length is the one nearest (beyond) its limit
    check = record["checks"][3]
    assert kl == fmt_kl(check["value"]) and baseline == fmt_kl(check["baseline"])
    share = 100 * (check["value"] - check["baseline"]) / check["tolerance"]
    assert change.endswith(f"({share:+.0f} % of the ±{fmt_kl(0.1)} allowed)")
    assert rows["wanda-s50"][1] == "⬇ better"
    assert rows["gptq-w3-g128"][1] == "⚠ error" and rows["gptq-w3-g128"][2] == "—"
    for f in record["findings"]:
        line = next(x for x in head.splitlines() if f"`{f['claim']}`" in x)
        assert f"**{f['holds']}**" in line and f["title"] in line
    assert "stored verdict was 'no'" in head  # quant-rises did not reproduce
    assert (
        "**Run:** `smollm2-135m` · engine torch · float32 on cpu · 3 method(s) · lengths 256, 512, 1024, 2048"
        in head
    )
    assert f"]({REPORT_PNG})" in head


def test_summary_stays_short_with_many_methods_and_failures(record):
    rec = copy.deepcopy(record)
    entry = rec["methods"]["wanda-s50"]
    for i in range(40):  # 40 more methods, each failing at every length
        rec["methods"][f"m{i}"] = copy.deepcopy(entry)
        rec["checks"] += [
            {"method": f"m{i}", "length": L, "kind": "kl", "value": 1.0, "baseline": 0.5, "tolerance": 0.1,
             "outcome": "fail"}
            for L in LENGTHS
        ]  # fmt: skip
    head = _summary(render_markdown(rec))
    assert len(head.rstrip("\n").splitlines()) <= 40
    assert "**FAILED**" in head and "… and 156 more (see Baseline checks)" in head
    assert "more method(s), every check passing" not in head  # failing methods are never the ones cut
    assert "not passing (see Baseline checks)" in head


def test_summary_is_appended_to_github_step_summary(record, tmp_path, monkeypatch):
    from lcc_harness.report import append_step_summary, summary_markdown

    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert append_step_summary(record) is None
    target = tmp_path / "step-summary.md"
    target.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    assert append_step_summary(record) == target
    text = target.read_text()
    assert text.startswith("earlier step\n# Long-context KL report")
    assert text[len("earlier step\n") :] == summary_markdown(record) + "\n"
    assert summary_markdown(record) in render_markdown(record)  # the same lines as the report's opening
    assert "## Window KL" not in text
