"""bench/ on the tiny model, in a subprocess: the benchmark suite runs and writes every key docs/benchmarks.md quotes
(so that `make bench` cannot rot unnoticed between the long documented runs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEYS = (
    "forward_s",
    "per_method_s",
    "ratio_to_forward",
    "naive_speedup",
    "peak_rss_mb",
    "weights_mb",
    "cache_hit_ratio",
    "machine",
    "rss_copy",
    "rss_anatomy",
    "matched",
    "whole_run",
    "goals",
    "guard",
    "commit",
    "xdist",
)


@pytest.mark.slow
def test_bench_smoke_writes_every_key(tmp_path: Path) -> None:
    stem = tmp_path / "bench"
    env = {  # when this test itself runs under xdist, its variables must not reach the inner session
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))},
        "LCC_BENCH_MODEL": "tiny-llama",
        "LCC_BENCH_REPORT": str(stem),
        "LCC_BENCH_COMPRESS_METHODS": "rtn-w3-g32,gptq-w3-g32",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    data = json.loads(stem.with_suffix(".json").read_text())
    for key in KEYS:
        assert data.get(key) not in (None, {}, []), key
    methods = set(data["config"]["ratio_methods"])
    assert set(data["per_method_s"]) == methods == set(data["ratio_to_forward"])
    assert all(math.isfinite(v) and v > 0 for v in data["ratio_to_forward"].values())
    assert set(data["compress_s"]) == {"rtn-w3-g32", "gptq-w3-g32"}
    assert set(data["peak_rss_mb"]) == {str(L) for L in data["config"]["rss_lengths"]}
    assert set(data["rss_copy"]) == {str(max(data["config"]["rss_lengths"]))}
    assert set(data["xdist"]) == {"n1", "n2"} and all(v["seconds"] > 0 for v in data["xdist"].values())
    assert all("passed" in v["result"] for v in data["xdist"].values()), data["xdist"]
    assert data["naive_speedup"] > 0 and 0 <= data["cache_hit_ratio"] < 1
    assert data["matched"]["forwards"] > 0 and data["whole_run"]["ratio"] > 0
    assert set(data["rss_anatomy"]) == {str(max(data["config"]["rss_lengths"]))}
    goals = {g["what"]: g for g in data["goals"]}
    for what in (
        "naive whole run ÷ one-pass whole run",
        "matched design: measurement ÷ forward, per method and sample",
    ):
        assert goals[what]["met"] in (True, False) and goals[what]["value"] > 0, goals[what]
    assert data["commit"]["sha"] and len(data["commit"]["sha"]) == 40
    # the guard compares with the committed bench.json (another configuration: still compared, and said)
    assert data["guard"]["against"] and data["guard"]["same_config"] is False and data["guard"]["rows"]
    md = stem.with_suffix(".md").read_text()
    assert "naive whole run ÷ one-pass whole run" in md and "| rtn-w3-g32" in md and "## Speed guard" in md
