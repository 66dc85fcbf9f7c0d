"""The llama.cpp engine's cost against llama.cpp's own forward (issue "a llama.cpp engine", item 8).

One sample at LCC_BENCH_LLAMA_LENGTH tokens (default 4096) of SmolLM2 through llama.cpp, for each method of
LCC_BENCH_LLAMA_METHODS (default kv-q8_0,gguf-q4_0):

- own forward: the reference context and the method's context each decode the tokens alone, logits for every
  position, nothing read from them (what llama.cpp itself spends);
- measurement: the harness's paired pass (both contexts in lock-step, logits compared per micro-batch);
- ratio = measurement ÷ (reference forward + method forward); goal ≤ 1.10: the comparison adds at most 10 %;
- tokens/s per engine: llama.cpp's reference forward, and the torch engine's plain `model(ids)` of the same tokens;
- peak RSS of a fresh process that loads the reference and measures the first method (weights = the F32 file).

Writes `reports/bench-llamacpp.{json,md}` (LCC_BENCH_LLAMA_REPORT). Skipped in the tiny smoke run
(LCC_BENCH_MODEL=tiny-llama) and where llama-cpp-python is missing.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
if os.environ.get("LCC_BENCH_MODEL", "smollm2-135m") != "smollm2-135m":
    pytest.skip("the llama.cpp bench runs on SmolLM2 only", allow_module_level=True)

LENGTH = int(os.environ.get("LCC_BENCH_LLAMA_LENGTH", "4096"))
METHODS = tuple(os.environ.get("LCC_BENCH_LLAMA_METHODS", "kv-q8_0,gguf-q4_0").split(","))
REPORT = Path(os.environ.get("LCC_BENCH_LLAMA_REPORT", "reports/bench-llamacpp"))
GOAL = 1.10
RESULTS: dict = {"config": {"length": LENGTH, "methods": list(METHODS)}, "methods": {}}

# The child's own high-water mark is VmHWM (reset at exec). Not ru_maxrss: on Linux a forked child's ru_maxrss
# starts at its parent's RSS at the fork, so with this bench's harness already loaded in the parent it read
# 4495 MB where the child itself peaked at 2278 MiB (bench/llamacpp_rss.py).
PROBE = """
from lcc_harness.engines.torch.harness import RunConfig
from lcc_harness.engines.llamacpp.harness import LlamaCppHarness
h = LlamaCppHarness(RunConfig(engine="llama.cpp", lengths=({L},), samples=1, design="window"))
h.run("{m}")
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(hwm // 1024, h.ref_path.stat().st_size // 2**20)
"""


@pytest.fixture(scope="module")
def h():
    from lcc_harness.engines.llamacpp.harness import LlamaCppHarness
    from lcc_harness.engines.results import RunConfig

    harness = LlamaCppHarness(RunConfig(engine="llama.cpp", lengths=(LENGTH,), samples=1, design="window"))
    yield harness
    harness.close()
    _write()


def _forward(ctx, ids) -> float:
    t0 = time.perf_counter()
    for _ in ctx.logit_blocks(ids):
        pass
    return time.perf_counter() - t0


@pytest.mark.parametrize("method", METHODS)
def test_measurement_over_own_forward(benchmark, h, method):
    from lcc_harness.engines.llamacpp.binding import Context, paired_pass
    from lcc_harness.methods import parse_method

    m = parse_method(method)
    model, _ = h._compressed_model(m)
    spec = m.engine_spec()
    cmp = Context(model, h.spec(type_k=spec.type_k or h.ref_kv, type_v=spec.type_v or h.ref_kv))
    ids = h.samples[0].ids[:LENGTH]
    ref = h.ref_context()
    f_ref, f_cmp = _forward(ref, ids), _forward(cmp, ids)
    box = {}

    def measure():
        t0 = time.perf_counter()
        paired_pass(ref, cmp, ids, h.cfg.chunk_size)
        box["s"] = time.perf_counter() - t0

    benchmark.pedantic(measure, rounds=1, iterations=1)
    cmp.close()
    if model is not h.ref_model:
        model.close()
    ratio = box["s"] / (f_ref + f_cmp)
    RESULTS["methods"][method] = {
        "forward_ref_s": f_ref,
        "forward_cmp_s": f_cmp,
        "measurement_s": box["s"],
        "ratio_to_own_forwards": ratio,
        "goal": GOAL,
        "met": ratio <= GOAL,
    }
    RESULTS["llama_cpp_tokens_per_s"] = LENGTH / f_ref


def test_torch_tokens_per_s(benchmark, h):
    import torch

    from lcc_harness.models.load import load_model

    lm = load_model("smollm2-135m", "cpu", "float32")
    ids = h.samples[0].ids[:LENGTH].view(1, -1)
    box = {}

    def fwd():
        t0 = time.perf_counter()
        with torch.no_grad():
            lm.model(ids)
        box["s"] = time.perf_counter() - t0

    benchmark.pedantic(fwd, rounds=1, iterations=1)
    RESULTS["torch_tokens_per_s"] = LENGTH / box["s"]


def test_peak_rss(benchmark, h):
    code = PROBE.format(L=LENGTH, m=METHODS[0])
    box = {}

    def run():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
        assert out.returncode == 0, out.stderr[-2000:]
        box["rss"], box["weights"] = (int(x) for x in out.stdout.split()[-2:])

    benchmark.pedantic(run, rounds=1, iterations=1)
    RESULTS["peak_rss_mb"] = box["rss"]
    RESULTS["weights_mb"] = box["weights"]
    RESULTS["rss_headroom_mb"] = box["rss"] - box["weights"]
    RESULTS["rss_goal_mb"] = 1536


def _write() -> None:
    import subprocess as sp

    commit = sp.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    # a partial run (-k) updates what it measured and keeps the rest; `commits` says which commit measured what
    fresh = {k for k in ("llama_cpp_tokens_per_s", "torch_tokens_per_s", "peak_rss_mb") if k in RESULTS}
    fresh |= {f"methods.{m}" for m in RESULTS["methods"]}
    old = REPORT.with_suffix(".json")
    if old.is_file():
        prev = json.loads(old.read_text())
        RESULTS["methods"] = {**prev.get("methods", {}), **RESULTS["methods"]}
        for k, v in prev.items():
            RESULTS.setdefault(k, v)
    RESULTS["commits"] = {**RESULTS.get("commits", {}), **dict.fromkeys(sorted(fresh), commit)}
    RESULTS["machine"] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    RESULTS["date"] = time.strftime("%Y-%m-%d")
    RESULTS["commit"] = commit
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.with_suffix(".json").write_text(json.dumps(RESULTS, indent=1) + "\n")
    lines = [
        f"# llama.cpp engine bench — SmolLM2-135M F32, one sample of {LENGTH} tokens ({RESULTS['date']}, {commit})",
        "",
        "| method | reference forward s | method forward s | measurement s | ÷ both forwards | goal ≤ 1.10 |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in RESULTS["methods"].items():
        lines.append(
            f"| `{m}` | {r['forward_ref_s']:.2f} | {r['forward_cmp_s']:.2f} | {r['measurement_s']:.2f} | "
            f"{r['ratio_to_own_forwards']:.3f} | {'met' if r['met'] else 'NOT met'} |"
        )
    lines += [
        "",
        f"tokens/s at {LENGTH}: llama.cpp {RESULTS.get('llama_cpp_tokens_per_s', 0):.0f}, "
        f"torch {RESULTS.get('torch_tokens_per_s', 0):.0f}",
    ]
    if "peak_rss_mb" in RESULTS:
        lines.append(
            f"peak RSS {RESULTS['peak_rss_mb']} MB, weights {RESULTS['weights_mb']} MB: headroom "
            f"{RESULTS['rss_headroom_mb']} MB (goal ≤ 1536)"
        )
    REPORT.with_suffix(".md").write_text("\n".join(lines) + "\n")
