"""The gate on the real default profile (SmolLM2-135M, 8 samples, 256…2048), against the committed baseline.

Runs after `make report` in CI (`.ci/run` sets LCC_E2E=1), when the reference is in the cache: each session
below costs one compression and one window measurement of rtn-w3-g64 (`--lcc-design window`: the gate reads
window curves only; ~30–60 s on 2 cores). Skipped otherwise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ROOT / "baselines" / "smollm2-135m.float32.cpu.default.json"
METHOD = "rtn-w3-g64"

pytestmark = pytest.mark.skipif(
    os.environ.get("LCC_E2E") != "1",
    reason="end-to-end on SmolLM2: set LCC_E2E=1 (CI does, after make report)",
)


def session(tmp: Path, baselines: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "suites/test_kl_regression.py", "-q", "-p", "no:cacheprovider"]
    cmd += [
        "--lcc-profile",
        "default",
        "--lcc-methods",
        METHOD,
        "--lcc-device",
        "cpu",
        "--lcc-design",
        "window",
    ]
    cmd += ["--lcc-baseline-dir", str(baselines), "--lcc-report-dir", str(tmp / "reports")]
    cmd += [*extra] if "--lcc-probes" in extra else ["--lcc-probes", "none", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)


def checks(tmp: Path) -> list[dict]:
    return json.loads((tmp / "reports" / "kl_report.json").read_text())["checks"]


def test_three_percent_worse_fails_every_length_and_the_unchanged_method_passes_reruns(tmp_path):
    committed = tmp_path / "committed"
    committed.mkdir()
    shutil.copy(BASELINE, committed / BASELINE.name)
    for i in range(5):  # identical reruns against the committed baseline
        r = session(tmp_path, committed)
        assert r.returncode == 0, f"rerun {i}: {r.stdout[-3000:]}"
        assert {c["outcome"] for c in checks(tmp_path)} == {"pass"}, checks(tmp_path)

    lowered = tmp_path / "lowered"
    lowered.mkdir()
    data = json.loads(BASELINE.read_text())
    for c in data["methods"][METHOD]["curves"].values():
        c["per_sample"] = [x * 0.97 for x in c["per_sample"]]
        c["window_kl"] = math.fsum(c["per_sample"]) / len(c["per_sample"])
    (lowered / BASELINE.name).write_text(json.dumps(data, indent=1, sort_keys=True))
    r = session(tmp_path, lowered)
    assert r.returncode == 1, r.stdout[-3000:]
    kl = [c for c in checks(tmp_path) if c["kind"] == "kl"]
    assert [c["outcome"] for c in kl] == ["fail"] * 4, kl
    n = data["spec"]["samples"]
    assert all(c["paired"]["worse"] == n for c in kl)
    assert "4 failed, 1 passed" in r.stdout  # growth is unchanged by a uniform regression


def test_five_percent_worse_key_token_and_copy_kl_fail_every_length_where_defined_and_reruns_pass(tmp_path):
    """The probes' gate: key-token KL and copy KL lowered by 5 % in the baseline fail at every length where the
    probe is defined (n/a cells stay n/a); the unchanged method passes its rerun."""
    committed = tmp_path / "committed"
    committed.mkdir()
    shutil.copy(BASELINE, committed / BASELINE.name)
    probes = ("--lcc-probes", "keytokens,copy")
    r = session(tmp_path, committed, *probes)
    assert r.returncode == 0, r.stdout[-3000:]
    got = [c for c in checks(tmp_path) if c["kind"].startswith("probe:")]
    assert {c["outcome"] for c in got} <= {"pass", "n/a"} and any(c["outcome"] == "pass" for c in got), got

    data = json.loads(BASELINE.read_text())
    defined = 0
    for cells in data["methods"][METHOD]["probes"].values():
        for c in cells.values():
            if c is not None:
                c["per_sample"] = [x * 0.95 for x in c["per_sample"]]
                c["kl"] = math.fsum(c["per_sample"]) / len(c["per_sample"])
                defined += 1
    lowered = tmp_path / "lowered"
    lowered.mkdir()
    (lowered / BASELINE.name).write_text(json.dumps(data, indent=1, sort_keys=True))
    r = session(tmp_path, lowered, *probes)
    assert r.returncode == 1, r.stdout[-3000:]
    got = [c for c in checks(tmp_path) if c["kind"].startswith("probe:")]
    assert sum(c["outcome"] == "fail" for c in got) == defined >= 4, got
    assert {c["outcome"] for c in got} <= {"fail", "n/a"}, got
