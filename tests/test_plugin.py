"""The pytest plugin end to end, in subprocesses on the tiny model (smoke profile)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

METHODS = "rtn-w3-g32,rtn-w4-g32"


def run(p: pytest.Pytester, *args: str) -> pytest.RunResult:
    return p.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-rfE", *args)


def baseline_file(p: pytest.Pytester) -> Path:
    return p.path / "baselines" / "tiny-llama.float32.cpu.smoke.json"


@pytest.mark.slow
def test_missing_baseline_fails_with_command(project):
    r = run(project, "--lcc-methods", METHODS, "test_kl_regression.py")
    r.assert_outcomes(failed=8)
    r.stdout.fnmatch_lines(
        [
            "*no baseline for rtn-w3-g32 at length 64*create it with: pytest suites/ "
            "--lcc-profile smoke --lcc-methods rtn-w3-g32 --lcc-update-baselines*"
        ]
    )


@pytest.mark.slow
def test_update_then_pass_then_worse_method_fails(project):
    r = run(project, "--lcc-methods", METHODS, "--lcc-update-baselines")
    r.assert_outcomes(passed=9, skipped=3)  # claims needing unselected methods skip
    data = json.loads(baseline_file(project).read_text())
    assert sorted(data["methods"]) == ["rtn-w3-g32", "rtn-w4-g32"]
    assert data["findings"] == {"lowbit-rises": data["findings"]["lowbit-rises"]}
    before = baseline_file(project).read_text()

    r = run(project, "--lcc-methods", METHODS)
    r.assert_outcomes(passed=9, skipped=3)
    assert (project.path / "reports" / "kl_report.md").exists()
    assert (project.path / "reports" / "kl_vs_context.png").exists()

    # re-running the update changes nothing on disk
    run(project, "--lcc-methods", METHODS, "--lcc-update-baselines").assert_outcomes(passed=9, skipped=3)
    assert baseline_file(project).read_text() == before

    # a deliberately worse quantizer under the existing id: 3-bit ids quantize at 2 bits
    project.makeconftest(
        textwrap.dedent("""
        from dataclasses import dataclass
        from lcc_harness.methods.basic import RTN
        from lcc_harness.methods.registry import register

        @register(replace=True)
        @dataclass(frozen=True)
        class WorseRTN(RTN):
            def apply(self, model, ctx):
                bits = self.bits - 1 if self.bits == 3 else self.bits
                return RTN(bits=bits, group=self.group, sym=self.sym).apply(model, ctx)
        """)
    )
    r = run(project, "--lcc-methods", METHODS, "test_kl_regression.py", "-k", "test_kl_within_baseline")
    r.assert_outcomes(failed=3, passed=3)
    out = r.stdout.str()
    for L in (64, 128, 256):
        assert f"FAILED test_kl_regression.py::test_kl_within_baseline[rtn-w3-g32-{L}]" in out
        assert f"test_kl_within_baseline[rtn-w4-g32-{L}]" not in out


@pytest.mark.slow
def test_update_keeps_entries_that_did_not_run(project):
    run(project, "--lcc-methods", METHODS, "--lcc-update-baselines", "test_kl_regression.py")
    run(project, "--lcc-methods", "rtn-w3-g32", "--lcc-update-baselines", "test_kl_regression.py")
    data = json.loads(baseline_file(project).read_text())
    assert sorted(data["methods"]) == ["rtn-w3-g32", "rtn-w4-g32"]


@pytest.mark.slow
def test_failing_and_nan_methods_do_not_stop_the_others(project):
    project.makeconftest(
        textwrap.dedent("""
        import re
        from dataclasses import dataclass
        import torch
        from lcc_harness.methods.registry import Method, register

        @register
        @dataclass(frozen=True)
        class Boom(Method):
            family = "boom"
            pattern = re.compile(r"boom")
            forms = ("boom",)
            @property
            def id(self):
                return "boom"
            @classmethod
            def from_match(cls, m):
                return cls()
            def apply(self, model, ctx):
                raise RuntimeError("kaboom in apply")

        @register
        @dataclass(frozen=True)
        class NaNs(Method):
            family = "nans"
            pattern = re.compile(r"nans")
            forms = ("nans",)
            @property
            def id(self):
                return "nans"
            @classmethod
            def from_match(cls, m):
                return cls()
            def apply(self, model, ctx):
                with torch.no_grad():
                    model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
                return model
        """)
    )
    run(project, "--lcc-methods", "rtn-w4-g32", "--lcc-update-baselines", "test_kl_regression.py")
    r = run(project, "--lcc-methods", "boom,nans,rtn-w4-g32", "test_kl_regression.py")
    r.assert_outcomes(passed=4, failed=4, errors=4)
    out = r.stdout.str()
    assert "ERROR test_kl_regression.py::test_kl_within_baseline[boom-64]" in out
    assert "kaboom in apply" in out
    assert "FAILED test_kl_regression.py::test_kl_within_baseline[nans-64]" in out
    assert "non-finite" in out
    report = json.loads((project.path / "reports" / "kl_report.json").read_text())
    assert report["methods"]["boom"]["status"] == "error"
    assert report["methods"]["nans"]["status"] == "non-finite"
    assert report["methods"]["rtn-w4-g32"]["status"] == "ok"


@pytest.mark.slow
def test_cases_record_kl_and_tolerance_as_junit_properties_and_the_summary_reaches_the_step_summary(
    project, monkeypatch
):
    import xml.etree.ElementTree as ET

    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert (
        run(project, "--lcc-methods", "rtn-w4-g32", "--lcc-update-baselines", "test_kl_regression.py").ret
        == 0
    )
    step_summary = project.path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    r = run(project, "--lcc-methods", "rtn-w4-g32", "test_kl_regression.py", "--junitxml", "junit.xml")
    assert r.ret == 0, r.stdout.str()[-3000:]
    cases = {
        tc.get("name"): {p.get("name"): p.get("value") for p in tc.iter("property")}
        for tc in ET.parse(project.path / "junit.xml").getroot().iter("testcase")
    }
    kl_cases = {n: p for n, p in cases.items() if n.startswith("test_kl_within_baseline")}
    assert sorted(kl_cases) == [f"test_kl_within_baseline[rtn-w4-g32-{L}]" for L in (128, 256, 64)]
    for name, props in kl_cases.items():
        assert props["method"] == "rtn-w4-g32" and name.endswith(f"-{props['length']}]")
        assert float(props["kl"]) > 0 and float(props["tolerance"]) > 0 and props["outcome"] == "pass"
        assert float(props["baseline"]) == pytest.approx(float(props["kl"]), rel=1e-4)
    growth = cases["test_kl_growth_within_baseline[rtn-w4-g32]"]
    assert float(growth["growth"]) > 0 and "tolerance" in growth
    text = step_summary.read_text()
    assert text.startswith("# Long-context KL report — tiny-llama") and "**PASSED**" in text
    row = next(x for x in text.splitlines() if x.startswith("| `rtn-w4-g32`"))
    assert row.split("|")[2].strip() == "✅ pass"
    assert len(text.rstrip("\n").splitlines()) <= 40 and "## Window KL" not in text
