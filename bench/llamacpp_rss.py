"""Peak resident memory of one llama.cpp-engine run, and the phase it happens in (issue 26: peak ≤ weights + 1.5 GiB).

A thread samples VmRSS every 0.2 s while a harness is built and one method is measured on one sample at --length;
prints the RSS after the harness is built, the peak and its phase (paired_pass = both contexts decoding), and the
weights (the reference GGUF's size). SmolLM2 by default.

    python bench/llamacpp_rss.py [--model M] [--length 8192] [--method gguf-q4_0]
"""

from __future__ import annotations

import argparse
import json
import threading
import time


def _rss_mb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--method", default="gguf-q4_0")
    args = p.parse_args()

    import lcc_harness.engines.llamacpp.harness as engine
    from lcc_harness.engines.results import RunConfig

    peak, phase = {"mb": 0, "phase": ""}, ["building the harness"]

    def sample() -> None:
        while True:
            r = _rss_mb()
            if r > peak["mb"]:
                peak.update(mb=r, phase=phase[0])
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    h = engine.LlamaCppHarness(
        RunConfig(model=args.model, engine="llama.cpp", lengths=(args.length,), samples=1, design="window")
    )
    time.sleep(0.5)
    built = _rss_mb()
    paired = engine.paired_pass

    def traced(*a, **kw):
        phase[0] = "paired_pass"
        try:
            return paired(*a, **kw)
        finally:
            phase[0] = "after paired_pass"

    engine.paired_pass = traced
    phase[0] = "compressing"
    h.run(args.method)
    time.sleep(0.5)
    weights = h.ref_path.stat().st_size // 2**20
    out = {
        "model": args.model,
        "length": args.length,
        "method": args.method,
        "rss_after_build_mb": built,
        "peak_rss_mb": peak["mb"],
        "peak_phase": peak["phase"],
        "weights_mb": weights,
        "headroom_mb": peak["mb"] - weights,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
