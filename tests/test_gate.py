"""The regression gate: the rule on numbers, then end to end under pytest on the tiny model (smoke profile)."""

from __future__ import annotations

import json
import math
import textwrap

import pytest

from lcc_harness.gate.check import (
    DEFAULT_EPS,
    K_NOISE,
    Policy,
    check_growth,
    check_kl,
    floor_from_self_noise,
    parse_method_eps,
)
from lcc_harness.measure.growth import growth_ratio

FLOOR = 1e-6
BASE = [0.50, 0.62, 0.58, 0.71]


# ---- the rule --------------------------------------------------------------------------------------------


def test_three_percent_worse_fails_two_percent_better_is_better_small_change_is_changed():
    worse = check_kl([x * 1.03 for x in BASE], BASE, DEFAULT_EPS, FLOOR, 1e-7)
    assert worse.outcome == "fail" and worse.paired.worse == 4 and worse.paired.n == 4
    assert math.isclose(worse.paired.min_rel, 0.03) and "4/4 worse" in worse.message
    assert check_kl([x * 0.97 for x in BASE], BASE, DEFAULT_EPS, FLOOR, 1e-7).outcome == "better"
    changed = check_kl([x * 1.01 for x in BASE], BASE, DEFAULT_EPS, FLOOR, 1e-7)
    assert changed.outcome == "changed"
    # one sample 8 % worse, the rest unchanged: the mean moves 2.1 %, beyond ε, and the paired count says who
    one = check_kl([BASE[0]] * 1 + BASE[1:3] + [BASE[3] * 1.08], BASE, DEFAULT_EPS, FLOOR, 1e-7)
    assert one.outcome == "fail" and one.paired.worse == 1


def test_identical_values_pass_whatever_the_sample_count_or_level():
    for base in (BASE, [0.063957], [0.0, 0.0], [1e-9]):
        assert check_kl(list(base), list(base), DEFAULT_EPS, FLOOR, 0.0).outcome == "pass"


def test_zero_kl_passes_on_the_floor_and_fails_above_it():
    assert check_kl([3e-7, 0.0], [0.0, 0.0], DEFAULT_EPS, FLOOR, 0.0).outcome == "pass"
    assert check_kl([3e-6, 0.0], [0.0, 0.0], DEFAULT_EPS, FLOOR, 0.0).outcome == "fail"


def test_noise_widens_the_tolerance_only_beyond_eps():
    c = check_kl(BASE, BASE, DEFAULT_EPS, FLOOR, 0.01)  # 1 % relative noise → band 5 %
    assert math.isclose(c.tolerance, K_NOISE * 0.01 * sum(BASE) / 4)
    c = check_kl(BASE, BASE, DEFAULT_EPS, FLOOR, 1e-6)
    assert math.isclose(c.tolerance, DEFAULT_EPS * sum(BASE) / 4)


def test_non_finite_values_fail():
    for bad in (float("nan"), float("inf")):
        assert check_kl([bad, 0.5, 0.5, 0.5], BASE, DEFAULT_EPS, FLOOR, 0.0).outcome == "fail"
        assert check_growth(bad, 1.1, DEFAULT_EPS, 0.0).outcome == "fail"


def test_growth_is_undefined_at_zero_kl_and_never_nan():
    assert growth_ratio([0.0, 0.0], [0.0, 0.0], FLOOR) is None
    assert growth_ratio([5e-5], [1e-4], FLOOR) is None  # within 100 floors: float noise
    assert growth_ratio([0.5, 0.7], [0.6, 0.8], FLOOR) == pytest.approx(1.4 / 1.2)
    c = check_growth(None, None, DEFAULT_EPS, 0.0)
    assert c.outcome == "n/a" and "undefined" in c.message
    assert check_growth(1.2 * 1.03, 1.2, DEFAULT_EPS, 0.0).outcome == "fail"
    assert check_growth(1.2, 1.2, DEFAULT_EPS, 0.0).outcome == "pass"


def test_policy_globs_and_bad_tolerances():
    p = Policy(per_method=parse_method_eps(["rtn-* = 0.05", "", "# note", "* = 0.1"], "ini"))
    assert p.for_method("rtn-w3-g64", "kl") == 0.05 and p.for_method("wanda-s50", "kl") == 0.1
    assert p.for_method("rtn-w3-g64", "growth") == DEFAULT_EPS
    for bad in (["rtn-*"], ["rtn-* = -0.1"], ["= 0.1"], ["x = nan"], ["x = 2"]):
        with pytest.raises(ValueError, match="ini"):
            parse_method_eps(bad, "ini")


def test_floor_follows_the_measured_self_noise():
    assert floor_from_self_noise(0.0, "float32") == 1e-6
    assert floor_from_self_noise(1e-3, "bfloat16") == pytest.approx(2e-3)


# ---- end to end ------------------------------------------------------------------------------------------


def run(p: pytest.Pytester, *args: str) -> pytest.RunResult:
    return p.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-rfE", "test_kl_regression.py", *args)


def stored(p: pytest.Pytester) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"baseline holds {token}")

    path = p.path / "baselines" / "tiny-llama.float32.cpu.smoke.json"
    return json.loads(path.read_text(), parse_constant=refuse)


def write(p: pytest.Pytester, data: dict) -> None:
    path = p.path / "baselines" / "tiny-llama.float32.cpu.smoke.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True, allow_nan=False))


@pytest.mark.slow
def test_three_percent_lower_baseline_fails_every_length_and_reruns_never_fail(project):
    m = "rtn-w3-g32"
    run(project, "--lcc-methods", m, "--lcc-update-baselines").assert_outcomes(passed=4)
    for _ in range(5):  # identical reruns
        run(project, "--lcc-methods", m).assert_outcomes(passed=4)
    data = stored(project)
    for c in data["methods"][m]["curves"].values():
        c["per_sample"] = [x * 0.97 for x in c["per_sample"]]
        c["window_kl"] = math.fsum(c["per_sample"]) / len(c["per_sample"])
    write(project, data)
    r = run(project, "--lcc-methods", m)
    r.assert_outcomes(failed=3, passed=1)  # every length; growth is unchanged
    r.stdout.fnmatch_lines(["*rtn-w3-g32 window KL at 64:*+3.09%*3/3 worse*"])
    report = json.loads((project.path / "reports" / "kl_report.json").read_text())
    kl = [c for c in report["checks"] if c["kind"] == "kl"]
    assert [c["outcome"] for c in kl] == ["fail"] * 3 and all(c["paired"]["worse"] == 3 for c in kl)
    # a wider policy for this method lets the same run pass, shown as "changed"
    r = run(project, "--lcc-methods", m, "--lcc-tolerance", "0.05")
    r.assert_outcomes(passed=4)
    report = json.loads((project.path / "reports" / "kl_report.json").read_text())
    assert {c["outcome"] for c in report["checks"] if c["kind"] == "kl"} == {"changed"}


@pytest.mark.slow
def test_a_really_worse_method_fails_every_length(project):
    m = "rtn-w3-g32"
    run(project, "--lcc-methods", m, "--lcc-update-baselines").assert_outcomes(passed=4)
    project.makeconftest(
        textwrap.dedent("""
        from dataclasses import dataclass
        import torch
        from lcc_harness.methods.basic import RTN
        from lcc_harness.methods.registry import register

        @register(replace=True)
        @dataclass(frozen=True)
        class LouderRTN(RTN):  # the same id, its weight error 2.5 % larger: KL ≈ 5 % higher
            @torch.no_grad()
            def apply(self, model, ctx):
                before = {n: lin.weight.clone() for n, lin in ctx.linears(model)}
                RTN(bits=self.bits, group=self.group, sym=self.sym).apply(model, ctx)
                for n, lin in ctx.linears(model):
                    lin.weight.copy_(before[n] + 1.025 * (lin.weight - before[n]))
                return model
        """)
    )
    run(project, "--lcc-methods", m).assert_outcomes(failed=3, passed=1)


@pytest.mark.slow
def test_one_sample_baseline_and_none_pass_their_own_reruns(project):
    args = ("--lcc-methods", "none,rtn-w4-g32", "--lcc-samples", "1")
    run(project, *args).assert_outcomes(failed=8)  # no baseline yet: each case names the command
    run(project, *args, "--lcc-update-baselines").assert_outcomes(passed=8)
    data = stored(project)  # no NaN / Infinity anywhere (parse_constant refuses them)
    assert data["methods"]["none"]["growth"]["ratio"] is None
    assert all(c["window_kl"] == 0.0 for c in data["methods"]["none"]["curves"].values())
    for _ in range(3):
        r = run(project, *args)
        r.assert_outcomes(passed=8)
    report = json.loads((project.path / "reports" / "kl_report.json").read_text())
    growth = {c["method"]: c["outcome"] for c in report["checks"] if c["kind"] == "growth"}
    assert growth == {"none": "n/a", "rtn-w4-g32": "pass"}
    assert "n/a" in (project.path / "reports" / "kl_report.md").read_text()


@pytest.mark.slow
def test_bad_tolerance_options_are_usage_errors(project):
    r = run(project, "--lcc-tolerance", "-0.1")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines(["*--lcc-tolerance -0.1 must be a fraction in [[]0, 1)*"])
    project.makeini("[pytest]\nlcc_profile = smoke\nlcc_method_tolerance =\n    rtn-* 0.05\n")
    r = run(project)
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines(["*lcc_method_tolerance line 'rtn-* 0.05' is not 'GLOB = EPS'*"])


# ---- method selection and registration ------------------------------------------------------------------


@pytest.mark.slow
def test_empty_method_selection_is_a_usage_error(project):
    for text in (" ", ",", ""):
        r = run(project, "--lcc-methods", text)
        assert r.ret == pytest.ExitCode.USAGE_ERROR, text
        r.stderr.fnmatch_lines(["*--lcc-methods '*' selects no method*"])


@pytest.mark.slow
def test_a_glob_selects_a_plugin_method_and_profile_ids_first(project):
    project.makeconftest(
        textwrap.dedent("""
        import re
        from dataclasses import dataclass
        from lcc_harness.methods.registry import Method, register

        @register
        @dataclass(frozen=True)
        class MyQuant(Method):
            family = "myquant"
            pattern = re.compile(r"myquant-w(?P<bits>\\d+)")
            forms = ("myquant-w{bits}",)
            examples = ("myquant-w4",)
            bits: int = 4
            @property
            def id(self):
                return f"myquant-w{self.bits}"
            @classmethod
            def from_match(cls, m):
                return cls(int(m["bits"]))
            def apply(self, model, ctx):
                return model
        """)
    )
    r = run(project, "--lcc-methods", "rtn-w3*,myquant-*", "--collect-only")
    out = r.stdout.str()
    assert "test_kl_within_baseline[myquant-w4-64]" in out and "[rtn-w3-g32-64]" in out
    assert "rtn-w3-g128" not in out  # an example id only when the profile/baseline has no match


def test_registration_refuses_duplicate_families_and_overlapping_ids():
    import re
    from dataclasses import dataclass

    from lcc_harness.errors import MethodError
    from lcc_harness.methods.basic import RTN
    from lcc_harness.methods.registry import Method, families, register, unregister

    families()

    @dataclass(frozen=True)
    class Hijack(Method):
        family = "hijack"
        pattern = re.compile(r"rtn-w(\d+)-g32")
        examples = ("rtn-w4-g32",)

    with pytest.raises(
        MethodError, match=r"'rtn-w4-g32' is matched by both family 'hijack'.*and family 'rtn'"
    ):
        register(Hijack)

    @dataclass(frozen=True)
    class Other(RTN):
        pass

    with pytest.raises(MethodError, match=r"family 'rtn' of .*Other is already registered by .*basic.RTN"):
        register(Other)
    assert families()["rtn"] is RTN and "hijack" not in families()
    register(RTN)  # the same class again is a no-op
    try:
        register(replace=True)(Other)
        assert families()["rtn"] is Other
    finally:
        unregister("rtn")
        register(RTN)


def test_plugin_messages_name_plugin_options():
    from lcc_harness.options import for_pytest

    msg = "pass --allow-extrapolation, lower --chunk-size, or choose --text-field; keep --lcc-samples and --json"
    assert for_pytest(msg) == (
        "pass --lcc-allow-extrapolation, lower --lcc-chunk-size, or choose --lcc-text-field; keep --lcc-samples "
        "and --json"
    )


@pytest.mark.slow
def test_a_plain_pytest_run_does_not_import_torch(pytester):
    """The plugin is active in every pytest run of the venv; until lcc is used it imports nothing heavy."""
    pytester.makepyfile(
        test_plain="""
        import sys

        def test_plain():
            assert "lcc_harness.plugin" in sys.modules  # the plugin is loaded...
            assert "torch" not in sys.modules and "transformers" not in sys.modules  # ...and light
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-q").assert_outcomes(
        passed=1
    )


@pytest.mark.slow
def test_unusable_output_locations_stop_the_session_before_any_model_is_loaded(project):
    (project.path / "blocker").write_text("a file")
    r = run(project, "--lcc-baseline-dir", "blocker")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stdout.fnmatch_lines(
        ["*baseline directory '*blocker' is a file; remove it or pass --lcc-baseline-dir*"]
    )
    (project.path / "baselines" / "tiny-llama.float32.cpu.smoke.json").mkdir(parents=True)
    r = run(project, "--lcc-update-baselines")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stdout.fnmatch_lines(["*baseline path '*tiny-llama.float32.cpu.smoke.json' is a directory*"])
    (project.path / "baselines" / "tiny-llama.float32.cpu.smoke.json").rmdir()
    r = run(project, "--lcc-cache-dir", "blocker")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stdout.fnmatch_lines(["*reference cache '*blocker' is a file, not a folder*"])
