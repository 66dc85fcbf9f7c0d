"""Bad input and faults under pytest (the plugin), on the tiny model and the smoke profile.

Errors that concern the whole session (options, model, corpus, lengths, report folder) stop it once with a
one-line message; errors of one method fail or error that method's tests only, named by id and length, and the
rest of the session goes on.

Most cases are separate pytest sessions over one project; to keep them fast they all run, one after the
other, in ONE subprocess (`DRIVER`, which calls pytest.main per case; pytester's in-process mode cannot be
used: restoring sys.modules after each run breaks transformers' lazy imports). xdist and Ctrl-C get their
own subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _gguf_util import tiny_vocab_size, write_tiny_llama_gguf

from lcc_harness.models.load import build_tiny_llama

TESTS = Path(__file__).resolve().parent
SUITES = TESTS.parent / "suites"
BASELINE = Path("baselines") / "tiny-llama.float32.cpu.smoke.json"
FAULTY_CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from _faulty import register_all
register_all()
"""


def make_project(root: Path, cache: Path) -> Path:
    """A user project with the shipped suites, the smoke profile and its own reference cache."""
    root.mkdir(parents=True, exist_ok=True)
    for f in SUITES.glob("test_*.py"):
        (root / f.name).write_text(f.read_text())
    (root / "pytest.ini").write_text(f"[pytest]\nlcc_profile = smoke\nlcc_cache_dir = {cache}\n")
    return root


@pytest.fixture()
def project(pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory) -> pytest.Pytester:
    make_project(pytester.path, tmp_path_factory.mktemp("cache"))
    return pytester


def subprocess_run(p: pytest.Pytester, *args: str, timeout: float | None = None) -> pytest.RunResult:
    return p.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-rfE", *args, timeout=timeout)


DRIVER = """
import contextlib, io, json, sys, time
import pytest
sys.path.insert(0, sys.argv[3])
from _faulty import register_all
register_all()
cases = json.load(open(sys.argv[1]))
results = {}
for name, args in cases.items():
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        ret = pytest.main(["-p", "no:cacheprovider", "-q", "-rfE", *args])
    results[name] = {"ret": int(ret), "out": out.getvalue(), "err": err.getvalue(),
                     "seconds": time.perf_counter() - t0}
json.dump(results, open(sys.argv[2], "w"))
"""


def _bad_gguf(root: Path) -> str:
    path = write_tiny_llama_gguf(root / "tiny.gguf", build_tiny_llama(vocab_size=tiny_vocab_size()))
    path.write_bytes(path.read_bytes()[:3000])
    return str(path)


def _write(root: Path, name: str, data: bytes) -> str:
    (root / name).write_bytes(data)
    return str(root / name)


# ---- session-level errors found before any test runs (pytest_configure): "ERROR: <message>" ---------------

CONFIG_CASES = {
    "length zero": (["--lcc-lengths", "0,64"], ("context length 0 must be positive",)),
    "length negative": (["--lcc-lengths=-64,128"], ("context length -64 must be positive",)),
    "length not an integer": (["--lcc-lengths", "64,2e3"], ("'2e3' is not an integer",)),
    "length duplicated": (["--lcc-lengths", "64,64"], ("[64] given more than once",)),
    "method unknown": (
        ["--lcc-methods", "rtn-w4-g32,rtm-w4-g32"],
        ("unknown method id 'rtm-w4-g32'", "did you mean"),
    ),
    "bits 17": (["--lcc-methods", "rtn-w17-g32"], ("bits=17 is out of range",)),
    "bits 0": (["--lcc-methods", "rtn-w0-g32"], ("bits=0 is out of range",)),
    "sparsity 150%": (["--lcc-methods", "wanda-s150"], ("sparsity 150% is out of range",)),
    "N:M with N = M": (["--lcc-methods", "magnitude-4:4"], ("N=4 is out of range",)),
    "glob matches nothing": (["--lcc-methods", "zzz-*"], ("pattern 'zzz-*' matches no known method id",)),
    "samples zero": (["--lcc-samples", "0"], ("--lcc-samples 0 must be at least 1",)),
    "samples a word": (["--lcc-samples", "many"], ("--lcc-samples 'many' is not an integer",)),
    "chunk size zero": (["--lcc-chunk-size", "0"], ("--lcc-chunk-size 0 must be at least 1",)),
    "target tokens a word": (
        ["--lcc-target-tokens", "abc"],
        ("--lcc-target-tokens 'abc' is not an integer",),
    ),
    "anatomy negative": (["--lcc-anatomy", "-1"], ("--lcc-anatomy -1 must be at least 0",)),
    "design unknown": (["--lcc-design", "foo"], ("--lcc-design 'foo' is not one of window, matched, both",)),
    "profile unknown": (["--lcc-profile", "huge"], ("unknown profile 'huge'",)),
    "dtype unknown": (["--lcc-dtype", "int8"], ("dtype 'int8' is not supported",)),
}
if not torch.cuda.is_available():
    CONFIG_CASES["cuda without CUDA"] = (
        ["--lcc-device", "cuda"],
        ("CUDA is not available", "--lcc-device cpu"),
    )

# ---- session-level errors found when the harness starts: "! _pytest.outcomes.Exit: lcc: <message> !" -----

START_CASES = {
    "model unknown": (lambda r: ["--lcc-model", "nosuch-model"], ("unknown model 'nosuch-model'",)),
    "model path missing": (lambda r: ["--lcc-model", str(r / "gone" / "m.gguf")], ("does not exist",)),
    "hub id not cached": (lambda r: ["--lcc-model", "lcc-test-org/not-cached"], ("never downloads",)),
    "gguf truncated": (lambda r: ["--lcc-model", _bad_gguf(r)], ("tiny.gguf", "corrupt, truncated")),
    "corpus missing": (lambda r: ["--lcc-corpus", str(r / "no.txt")], ("no.txt", "does not exist")),
    "corpus empty": (lambda r: ["--lcc-corpus", _write(r, "e.txt", b"\n \n")], ("is empty",)),
    "corpus not UTF-8": (
        lambda r: ["--lcc-corpus", _write(r, "b.txt", b"\xff\xfe\x00abc" * 500)],
        ("not UTF-8",),
    ),
    "jsonl without text field": (
        lambda r: ["--lcc-corpus", _write(r, "c.jsonl", b'{"content": "x"}\n')],
        ("line 1 has no string field 'text'", "--lcc-text-field"),
    ),
    "corpus too short": (
        lambda r: ["--lcc-corpus", _write(r, "s.txt", b"y" * 500)],
        ("500 tokens", "but 3 were requested"),
    ),
    "length beyond max positions": (
        lambda r: ["--lcc-lengths", "64,8192"],
        ("[8192] exceed tiny-llama's maximum of 4096", "--lcc-allow-extrapolation"),
    ),
    "report dir not writable": (
        lambda r: ["--lcc-report-dir", _write(r, "plain", b"x") + "/reports"],
        ("report directory", "is not writable", "--lcc-report-dir"),
    ),
}

# ---- baselines that cannot be used: failing tests that name the file -------------------------------------

BAD_BASELINES = {
    "corrupt JSON": ('{"schema": "lcc-baseline/3", "methods": {', "is not valid JSON"),
    "wrong schema": ('{"schema": "lcc-baseline/0", "methods": {}}', "does not follow schema lcc-baseline/3"),
    "another model": (
        json.dumps(
            {
                "schema": "lcc-baseline/3",
                "model": "smollm2-135m",
                "dtype": "float32",
                "device_type": "cpu",
                "profile": "smoke",
                "spec": {"samples": 3},
                "floor": {"kl": 1e-6},
                "methods": {},
            }
        ),
        "is for model='smollm2-135m' but this run has 'tiny-llama'",
    ),
}
FAULTY_METHODS = "fault-raise,fault-inf,fault-inf-logits,fault-oom-128,rtn-w4-g48,rtn-w4-g32"


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run every case as its own pytest session (one subprocess for all); case → {ret, out, err, dirs}."""
    root = tmp_path_factory.mktemp("sessions")
    proj = make_project(root / "project", root / "cache")
    (proj / "test_gpu_only.py").write_text(
        "import pytest\n\n@pytest.mark.gpu\ndef test_on_gpu():\n    raise AssertionError\n"
    )
    files = root / "files"
    files.mkdir()
    cases: dict[str, list[str]] = {}
    for name, (args, _) in CONFIG_CASES.items():
        cases[name] = args
    for name, (make_args, _) in START_CASES.items():
        cases[name] = ["--lcc-methods", "rtn-w4-g32", *make_args(files), "test_kl_regression.py"]
    for name, (text, _) in BAD_BASELINES.items():
        (root / f"baselines-{name}").mkdir()
        (root / f"baselines-{name}" / BASELINE.name).write_text(text)
        cases[name] = ["--lcc-methods", "rtn-w4-g32", "test_kl_regression.py"]
    corpus = _write(
        files,
        "body.jsonl",
        b"".join(json.dumps({"body": "some text " * 500}).encode() + b"\n" for _ in range(4)),
    )
    cases["text field and extrapolation"] = [
        "--lcc-methods",
        "rtn-w4-g32",
        "--lcc-corpus",
        corpus,
        "--lcc-text-field",
        "body",
        "--lcc-samples",
        "1",
        "--lcc-lengths",
        "64,4100",
        "--lcc-allow-extrapolation",
        "--lcc-update-baselines",
        "test_kl_regression.py",
    ]
    cases["gpu marker"] = ["-rs", "test_gpu_only.py"]
    cases["faulty methods"] = [
        "--lcc-methods",
        FAULTY_METHODS,
        "--lcc-update-baselines",
        "test_kl_regression.py",
    ]
    dirs = {}
    for name in cases:  # own report and baseline folders per case (a case's own options come after, and win)
        dirs[name] = {"reports": root / f"reports-{name}", "baselines": root / f"baselines-{name}"}
        cases[name] = [
            "--lcc-report-dir",
            str(dirs[name]["reports"]),
            "--lcc-baseline-dir",
            str(dirs[name]["baselines"]),
            *cases[name],
        ]
    (root / "cases.json").write_text(json.dumps(cases))
    hf_home = root / "hf_home"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub")}
    subprocess.run(
        [sys.executable, "-c", DRIVER, str(root / "cases.json"), str(root / "results.json"), str(TESTS)],
        cwd=proj,
        env=env,
        check=True,
        timeout=600,
    )
    results = json.loads((root / "results.json").read_text())
    for name, r in results.items():
        r.update(dirs[name])
    return results


def assert_session_error(r: dict, *words: str) -> str:
    """Exit status 4 (usage error), exactly one line naming the problem, no traceback, no test ran."""
    out = r["out"] + r["err"]
    assert r["ret"] == pytest.ExitCode.USAGE_ERROR, out
    assert "Traceback" not in out and "INTERNALERROR" not in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith(("ERROR: ", "! _pytest.outcomes.Exit: lcc: "))]
    assert len(lines) == 1, out
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert " passed" not in out and " failed" not in out and " error" not in out, out
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_option_is_one_usage_error(sessions, case):
    line = assert_session_error(sessions[case], *CONFIG_CASES[case][1])
    assert line.startswith("ERROR: ")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(START_CASES))
def test_bad_model_corpus_lengths_or_report_dir_stop_the_session_once(sessions, case):
    r = sessions[case]
    line = assert_session_error(r, *START_CASES[case][1])
    assert line.startswith("! _pytest.outcomes.Exit: lcc: ")
    assert not (r["reports"] / "kl_report.json").exists()  # nothing ran, nothing reported


@pytest.mark.slow
def test_text_field_and_extrapolation_options_are_honoured(sessions):
    r = sessions["text field and extrapolation"]
    assert r["ret"] == 0 and "3 passed" in r["out"], r["out"]
    data = json.loads((r["baselines"] / BASELINE.name).read_text())
    assert data["spec"]["lengths"] == [64, 4100] and "body.jsonl" in data["spec"]["corpus"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_gpu_marked_tests_skip_with_a_reason(sessions):
    r = sessions["gpu marker"]
    assert r["ret"] == 0 and "1 skipped" in r["out"], r["out"]
    assert "needs a CUDA GPU; none is available here" in r["out"]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_BASELINES))
def test_unusable_baseline_fails_the_checks_naming_the_file(sessions, case):
    text, words = BAD_BASELINES[case]
    r = sessions[case]
    path = r["baselines"] / BASELINE.name
    out = r["out"]
    # never "no baseline", never passing
    assert r["ret"] == pytest.ExitCode.TESTS_FAILED and "4 failed" in out, out
    assert out.count(f"baseline file '{path}' {words}") >= 4, out
    assert "Traceback" not in out and "raise BaselineError" not in out
    assert path.read_text() == text  # a compare run never rewrites it


# ---- faulty methods: only their own tests fail or error, the others run and report -----------------------


@pytest.mark.slow
def test_faulty_methods_fail_alone_and_are_reported(sessions):
    r = sessions["faulty methods"]
    out = r["out"]
    assert pytest.RunResult.parse_summary_nouns(out.splitlines()) == {
        "passed": 4,
        "failed": 12,
        "errors": 8,
    }, out
    # 6. a method that raises: its tests error, named by id (and length), with the exception in one line
    for L in (64, 128, 256):
        assert f"ERROR test_kl_regression.py::test_kl_within_baseline[fault-raise-{L}]" in out
        assert f"ERROR test_kl_regression.py::test_kl_within_baseline[rtn-w4-g48-{L}]" in out
    assert "method 'fault-raise' raised ZeroDivisionError: kaboom in apply while compressing" in out
    assert "group size 48 does not divide the input width 64" in out  # 5. parameter invalid for this model
    # 7. Inf weights and Inf logits fail as non-finite, never pass
    for m in ("fault-inf", "fault-inf-logits"):
        assert f"FAILED test_kl_regression.py::test_kl_growth_within_baseline[{m}]" in out
    assert (
        "method 'fault-inf' wrote non-finite values (NaN/Inf) into model.layers.1.self_attn.v_proj.weight"
        in out
    )
    assert "method 'fault-inf-logits' produced non-finite output at length 64" in out
    # 12. out of memory at the long length: that case fails naming the length and what to reduce
    assert "FAILED test_kl_regression.py::test_kl_within_baseline[fault-oom-128-256]" in out
    assert "out of memory measuring 'fault-oom-128' at length 256" in out and "chunk size" in out
    assert "a baseline entry needs every length, but length(s) [256] failed" in out
    assert "Traceback" not in out and "INTERNALERROR" not in out
    # the healthy method ran, and only it got a baseline entry
    assert sorted(json.loads((r["baselines"] / BASELINE.name).read_text())["methods"]) == ["rtn-w4-g32"]
    report = json.loads((r["reports"] / "kl_report.json").read_text())
    status = {m: e["status"] for m, e in report["methods"].items()}
    assert status == {
        "fault-raise": "error",
        "fault-inf": "non-finite",
        "fault-inf-logits": "non-finite",
        "fault-oom-128": "partial",
        "rtn-w4-g48": "error",
        "rtn-w4-g32": "ok",
    }
    assert sorted(report["methods"]["fault-oom-128"]["curves"], key=int) == ["64", "128"]
    assert "at length 256" in report["methods"]["fault-oom-128"]["error"]


# ---- xdist: only the controller writes baselines and the report ------------------------------------------


@pytest.mark.slow
def test_xdist_workers_update_baselines_without_losing_entries(project):
    log = project.path / "report-writes.log"
    project.makeconftest(
        textwrap.dedent(f"""
        import os
        import lcc_harness.report as report

        _write = report.write_reports

        def counting(record, out_dir):
            with open({str(log)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            return _write(record, out_dir)

        report.write_reports = counting
        """)
    )
    r = subprocess_run(
        project,
        "-n",
        "2",
        "--lcc-methods",
        "rtn-w3-g32,rtn-w4-g32",
        "--lcc-update-baselines",
        "test_kl_regression.py",
    )
    r.assert_outcomes(passed=8)
    data = json.loads((project.path / BASELINE).read_text())
    assert sorted(data["methods"]) == ["rtn-w3-g32", "rtn-w4-g32"]
    assert all(sorted(e["curves"], key=int) == ["64", "128", "256"] for e in data["methods"].values())
    assert len(log.read_text().split()) == 1  # one report, written by the controller
    report = json.loads((project.path / "reports" / "kl_report.json").read_text())
    assert sorted(report["methods"]) == ["rtn-w3-g32", "rtn-w4-g32"]


COUNTING_CONFTEST = (
    FAULTY_CONFTEST
    + """
import os
import lcc_harness.engines.torch.harness as run

_compress = run.Harness._compress

def counting(self, method, in_place):
    with open({log!r}, "a") as f:
        f.write(f"{{os.environ.get('PYTEST_XDIST_WORKER', 'main')}} {{getattr(method, 'id', method)}}\\n")
    return _compress(self, method, in_place)

run.Harness._compress = counting
"""
)


def _workers_per_method(out: str) -> dict[str, set[str]]:
    """From `-v` output lines like '[gw1] PASSED test_kl_regression.py::test_kl_within_baseline[rtn-w3-g32-64]'."""
    seen: dict[str, set[str]] = {}
    for line in out.splitlines():
        parts = line.split()
        test = next((p for p in parts if p.startswith("test_kl_regression.py::")), "")
        if parts and parts[0].startswith("[gw") and "[" in test:
            param = test.split("[", 1)[1].rstrip("]")
            method = param if "growth" in test else param.rsplit("-", 1)[0]
            seen.setdefault(method, set()).add(parts[0])
    return seen


@pytest.mark.slow
def test_xdist_loadgroup_keeps_each_method_on_one_worker_and_compresses_it_once(project):
    log = project.path / "compress.log"
    project.makeconftest(COUNTING_CONFTEST.format(log=str(log)))
    r = subprocess_run(project, "-n", "2", "--dist", "loadgroup", "-vv", "--lcc-update-baselines")
    r.assert_outcomes(passed=48)  # 11 methods × (3 lengths + growth) + 4 claims
    per_method = _workers_per_method(r.stdout.str())
    assert len(per_method) == 11 and all(len(w) == 1 for w in per_method.values()), per_method
    calls = [line.split()[1] for line in log.read_text().splitlines()]
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 11  # claims read results, never recompute


@pytest.mark.slow
def test_xdist_worker_killed_mid_method_fails_that_method_and_keeps_the_rest(project):
    project.makeconftest(FAULTY_CONFTEST)
    r = subprocess_run(
        project,
        "-n",
        "2",
        "--dist",
        "loadgroup",
        "--lcc-methods",
        "rtn-w3-g32,fault-kill,rtn-w4-g32",
        "--lcc-update-baselines",
        "test_kl_regression.py",
        timeout=240,  # the run must end: a hang here is the failure this test guards against
    )
    out = r.stdout.str() + r.stderr.str()
    assert "INTERNALERROR" not in out, out
    r.assert_outcomes(passed=8, failed=1, errors=3)
    assert "crashed while running 'test_kl_regression.py::test_kl_within_baseline[fault-kill-64]" in out
    assert "fault-kill: the process that was running 'fault-kill' (gw" in out
    data = json.loads((project.path / BASELINE).read_text())
    assert sorted(data["methods"]) == ["rtn-w3-g32", "rtn-w4-g32"]  # the finished methods are kept
    report = json.loads((project.path / "reports" / "kl_report.json").read_text())
    status = {m: e["status"] for m, e in report["methods"].items()}
    assert status == {"rtn-w3-g32": "ok", "rtn-w4-g32": "ok", "fault-kill": "error"}
    assert "died before finishing it" in report["methods"]["fault-kill"]["error"]


@pytest.mark.slow
def test_xdist_session_error_stops_every_worker_cleanly(project):
    """pytest.exit in a worker would crash xdist (INTERNALERROR); workers fail once and stop the run instead."""
    r = subprocess_run(project, "-n", "2", "--lcc-model", "nosuch-model", "test_kl_regression.py")
    out = r.stdout.str() + r.stderr.str()
    assert r.ret == pytest.ExitCode.INTERRUPTED and "INTERNALERROR" not in out, out
    assert "Interrupted: lcc: unknown model 'nosuch-model'" in out
    assert out.count("ERROR test_kl_regression.py::") <= 2  # at most the first test of each worker


# ---- Ctrl-C and SIGKILL: baselines are untouched or complete, never half-written -------------------------


def signal_pytest_when(
    project: pytest.Pytester, ready, sig: int, env: dict[str, str], *args: str
) -> tuple[int, str]:
    """Run pytest in `project`, send `sig` once `ready()` holds, and return (exit status, output)."""
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args]
    proc = subprocess.Popen(
        cmd,
        cwd=project.path,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # a shell that started us in the background may have set SIGINT to "ignore", which children inherit
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        t0 = time.monotonic()
        while not ready():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() - t0 < 240, "the awaited moment never came"
            time.sleep(0.02)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=300)  # generous: a loaded CI machine renders the report slowly
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig,workers",
    [(signal.SIGINT, 0), (signal.SIGTERM, 0), (signal.SIGTERM, 2)],
    ids=["ctrl-c", "sigterm", "sigterm-xdist"],
)
def test_ctrl_c_or_sigterm_writes_the_report_and_leaves_baselines_alone(project, sig, workers):
    project.makeconftest(FAULTY_CONFTEST)
    path = project.path / BASELINE
    path.parent.mkdir()
    path.write_text('{"schema": "lcc-baseline/1", "note": "must survive byte for byte"}\n')
    before = path.read_bytes()
    marker = project.path / "sleeping"  # fault-sleep starts once rtn-w4-g32 is done (one process)
    tmp = project.path / "tmp"  # where the controller makes its run folder (xdist)
    tmp.mkdir()

    def ready() -> bool:  # under xdist the two methods run side by side: wait for rtn-w4-g32's result too
        return marker.exists() and (not workers or any(tmp.glob("lcc-run-*/outcome-rtn-w4-g32-*.json")))

    ret, out = signal_pytest_when(
        project,
        ready,
        sig,
        {"LCC_TEST_MARKER": str(marker), "TMPDIR": str(tmp)},
        *(("-n", str(workers), "--dist", "loadgroup") if workers else ()),
        "--lcc-methods",
        "rtn-w4-g32,fault-sleep",
        "--lcc-update-baselines",
        "test_kl_regression.py",
    )
    assert ret == pytest.ExitCode.INTERRUPTED, out
    assert "baselines NOT written: the session was interrupted" in out
    if sig == signal.SIGTERM:
        assert "run stopped by SIGTERM: the report covers the 1 method(s) that finished" in out
    assert not list(tmp.glob("lcc-run-*")), "the run folder is removed at the end"
    assert path.read_bytes() == before
    report = json.loads((project.path / "reports" / "kl_report.json").read_text())
    assert report["methods"]["rtn-w4-g32"]["status"] == "ok" and "fault-sleep" not in report["methods"]
    assert {c["method"] for c in report["checks"]} == {"rtn-w4-g32"}


@pytest.mark.slow
def test_sigkill_while_the_plugin_writes_baselines_leaves_the_old_file(project):
    path = project.path / BASELINE
    path.parent.mkdir()
    path.write_text('{"schema": "lcc-baseline/1", "note": "old"}\n')
    before = path.read_bytes()

    def temps() -> list[Path]:
        return list(path.parent.glob(f".{path.name}.*.tmp"))

    ret, out = signal_pytest_when(
        project,
        temps,
        signal.SIGKILL,
        {"LCC_TEST_SLOW_WRITE": "5"},
        "--lcc-methods",
        "rtn-w4-g32",
        "--lcc-update-baselines",
        "test_kl_regression.py",
    )
    assert ret == -signal.SIGKILL, out
    assert path.read_bytes() == before  # the old file, intact
    (tmp,) = temps()
    with pytest.raises(json.JSONDecodeError):
        json.loads(tmp.read_text())  # killed half-way through the new one, which never replaced the old
    # the next update finishes the job and tidies up
    r = subprocess_run(
        project, "--lcc-methods", "rtn-w4-g32", "--lcc-update-baselines", "test_kl_regression.py"
    )
    r.assert_outcomes(passed=4)
    assert list(json.loads(path.read_text())["methods"]) == ["rtn-w4-g32"] and temps() == []


def test_method_of_a_node_id_takes_the_longest_matching_method():
    pytest.importorskip("xdist")
    from lcc_harness.session.xdist_sched import method_of

    ids = ["rtn-w4-g32", "rtn-w4-g32-sym", "wanda-s50"]
    assert method_of("t.py::test_kl_within_baseline[rtn-w4-g32-sym-64]", ids) == "rtn-w4-g32-sym"
    assert method_of("t.py::test_kl_within_baseline[rtn-w4-g32-64]", ids) == "rtn-w4-g32"
    assert method_of("t.py::test_kl_growth_within_baseline[wanda-s50]", ids) == "wanda-s50"
    assert method_of("t.py::test_claim[pruning-flat]", ids) is None
    assert method_of("t.py::test_plain", ids) is None


# ---- CI shards: --lcc-shard I/N and `lcc merge` -----------------------------------------------------------------
def _lcc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lcc_harness.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _without_dates(data: dict) -> dict:
    data = json.loads(json.dumps(data))
    data.get("meta", {}).pop("updated", None)
    return data


@pytest.mark.slow
def test_shards_merged_equal_one_unsharded_run(project):
    whole = subprocess_run(
        project, "--lcc-update-baselines", "--lcc-baseline-dir", "b-whole", "--lcc-report-dir", "r-whole"
    )
    whole.assert_outcomes(passed=48)
    shards = []
    for i in (1, 2):
        r = subprocess_run(
            project,
            "-rs",
            "--lcc-shard",
            f"{i}/2",
            "--lcc-update-baselines",
            "--lcc-baseline-dir",
            f"b-{i}",
            "--lcc-report-dir",
            f"r-{i}",
        )
        assert r.ret == 0 and "of other shards; `lcc merge` evaluates it" in r.stdout.str()
        shards.append(json.loads((project.path / f"r-{i}" / "lcc-record.json").read_text()))
    ran = [sorted(s["methods"]) for s in shards]
    assert not set(ran[0]) & set(ran[1]) and len(ran[0]) + len(ran[1]) == 11  # a split, nothing twice
    m = _lcc(
        "merge",
        "r-1",
        "r-2/lcc-record.json",
        "--update-baselines",
        "--baseline-dir",
        "b-merged",
        "--report-dir",
        "r-merged",
        cwd=project.path,
    )
    assert m.returncode == 0, m.stdout + m.stderr
    a = json.loads((project.path / "b-whole" / BASELINE.name).read_text())
    b = json.loads((project.path / "b-merged" / BASELINE.name).read_text())
    assert _without_dates(a) == _without_dates(b)
    report = json.loads((project.path / "r-merged" / "kl_report.json").read_text())
    assert len(report["findings"]) == 4 and sorted(report["methods"]) == sorted(ran[0] + ran[1])
    # compare mode: shards against the merged baselines, then a merge that re-checks every claim
    for i in (1, 2):
        subprocess_run(
            project, "--lcc-shard", f"{i}/2", "--lcc-baseline-dir", "b-merged", "--lcc-report-dir", f"c-{i}"
        )
    m = _lcc(
        "merge", "c-1", "c-2", "--baseline-dir", "b-merged", "--report-dir", "c-merged", cwd=project.path
    )
    assert m.returncode == 0, m.stdout + m.stderr
    report = json.loads((project.path / "c-merged" / "kl_report.json").read_text())
    assert [f["reproduced"] for f in report["findings"]] == [True] * 4
    # verdicts stored for other target tokens are not compared: the merge says so and exits 1
    other = project.path / "b-merged" / BASELINE.name
    data = json.loads(other.read_text())
    data["findings_basis"]["target_tokens"] = 16
    other.write_text(json.dumps(data))
    m = _lcc("merge", "c-1", "c-2", "--baseline-dir", "b-merged", "--report-dir", "c-other", cwd=project.path)
    assert m.returncode == 1, m.stdout + m.stderr
    report = json.loads((project.path / "c-other" / "kl_report.json").read_text())
    assert [f["stored"] for f in report["findings"]] == [None] * 4
    assert any(
        "judged on {'curves': 'matched', 'target_tokens': 16}" in c for c in report["baseline_changes"]
    )


@pytest.mark.slow
def test_merge_refuses_records_of_another_spec_and_overlapping_shards(project):
    for name, extra in (("r-a", ()), ("r-b", ("--lcc-samples", "2"))):
        subprocess_run(
            project, "--lcc-methods", "rtn-w4-g32", "--lcc-report-dir", name, *extra, "test_kl_regression.py"
        )
    m = _lcc("merge", "r-a", "r-b", cwd=project.path)
    assert m.returncode == 2 and "run records of different spec" in m.stderr and "samples=3" in m.stderr, (
        m.stderr
    )
    shutil.copytree(project.path / "r-a", project.path / "r-c")  # another record of the same method
    m = _lcc("merge", "r-a", "r-c", cwd=project.path)
    assert m.returncode == 2 and "method 'rtn-w4-g32' is in two records" in m.stderr, m.stderr
    m = _lcc("merge", "r-a", "r-a/lcc-record.json", cwd=project.path)
    assert m.returncode == 2 and "is given twice (as r-a and r-a/lcc-record.json)" in m.stderr, m.stderr
    m = _lcc("merge", "nowhere", cwd=project.path)
    assert m.returncode == 2 and "cannot read run record" in m.stderr, m.stderr


@pytest.mark.slow
@pytest.mark.parametrize("text", ["0/2", "3/2", "1-2", "x"])
def test_bad_shard_is_a_usage_error(project, text):
    r = subprocess_run(project, "--lcc-shard", text)
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "--lcc-shard" in r.stderr.str() and "I/N" in r.stderr.str()


# ---- one GPU group per xdist worker ------------------------------------------------------------------------------
ENV_TEST = """
import os

def _log():
    with open(os.environ["LCC_TEST_LOG"], "a") as f:
        f.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')} {os.environ.get('CUDA_VISIBLE_DEVICES')}\\n")

def test_a(): _log()
def test_b(): _log()
def test_c(): _log()
def test_d(): _log()
"""


@pytest.mark.slow
def test_gpus_per_worker_gives_each_worker_its_own_group(project, monkeypatch):
    project.makepyfile(test_env=ENV_TEST)
    log = project.path / "env.log"
    monkeypatch.setenv("LCC_TEST_LOG", str(log))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4,5,6")
    r = subprocess_run(project, "-n", "2", "--lcc-gpus-per-worker", "2", "test_env.py")
    r.assert_outcomes(passed=4)
    seen = dict(line.split() for line in log.read_text().splitlines())
    assert seen == {"gw0": "3,4", "gw1": "5,6"}
    r = subprocess_run(project, "-n", "3", "--lcc-gpus-per-worker", "2", "test_env.py")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "--lcc-gpus-per-worker 2 with 3 worker(s) needs 6 GPUs, 4 visible" in r.stderr.str()
