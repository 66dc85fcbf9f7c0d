"""What the long-range probes cost, in plain forwards at the longest length (issue: goal ≤ one extra forward per
method and sample for all probes together).

The reference's side (its analysis: the short-context passes; the probe sequences' reference pass) is paid once per
reference and cached; it is timed cold in a fresh cache folder. The method's side is timed per method: the probes
add one pass over each sample's probe sequence (the longest length) plus LM-head work at the scored rows; the
key-token and where probes reuse the window pass. Each is divided by samples × one plain `model(ids)` at the
longest length (median of 3), measured beside it.

    python bench/probe_cost.py [--model smollm2-135m] [--lengths 512,1024,2048] [--samples 2]
        [--methods rtn-w3-g64,magnitude-s50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from bench.matched_cost import plain_forward_s
from lcc_harness.engines.results import RunConfig
from lcc_harness.engines.torch.harness import Harness
from lcc_harness.options import PROBES, parse_lengths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--methods", default="rtn-w3-g64,magnitude-s50")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    lengths = parse_lengths(a.lengths)
    with tempfile.TemporaryDirectory() as cache:
        cfg = RunConfig(model=a.model, lengths=lengths, samples=a.samples, probes=PROBES, cache_dir=cache)
        h = Harness(cfg)
        _ = h.reference
        fwd = plain_forward_s(h.lm.model, h.samples[0].ids[: lengths[-1]])
        t0 = time.perf_counter()
        h.probe_reference()
        ref_s = time.perf_counter() - t0
        rows = []
        for m in a.methods.split(","):
            r = h.run(m)
            t = r.timings
            rows.append(
                {
                    "method": m,
                    "measurement_s": t["measurement_s"],
                    "probe_s": t["probe_s"],
                    "probe_forwards_per_sample": t["probe_s"] / (a.samples * fwd),
                    "measurement_forwards_per_sample": t["measurement_s"] / (a.samples * fwd),
                }
            )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    out = {
        "command": "python bench/probe_cost.py "
        + " ".join(
            f"--{k} {v}"
            for k, v in (
                ("model", a.model),
                ("lengths", a.lengths),
                ("samples", a.samples),
                ("methods", a.methods),
            )
        ),
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "plain_forward_s": fwd,
        "probe_reference_s": ref_s,
        "probe_reference_forwards_per_sample": ref_s / (a.samples * fwd),
        "goal": "probes ≤ 1 extra forward at the longest length per method and sample",
        "methods": rows,
    }
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
