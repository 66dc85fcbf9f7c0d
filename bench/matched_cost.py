"""What the matched-target design costs per method and sample, in plain forwards at the longest length.

Counts the tokens that go through the compressed model's decoder while `Harness.measure_matched` runs (the
reference comes from the cache: a second harness on the same cache directory), divides by samples × the longest
length, and times the same measurement (median of --repeats, after a warm-up) against one plain `model(ids)` at the longest length
(median of 3). The
window design (`measure_lengths`, one pass per sample) is measured beside it. For doubling lengths the token count
is (Lmin + … + Lmax) / Lmax = 2 − Lmin/Lmax; the time ratio is lower when attention, quadratic in L, dominates.

    python bench/matched_cost.py [--model tiny-llama] [--lengths 256,512,1024,2048] [--samples 2] [--methods …]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from lcc_harness.engines.results import RunConfig
from lcc_harness.engines.torch.harness import Harness
from lcc_harness.measure.head import decoder_of
from lcc_harness.models.load import load_model
from lcc_harness.options import parse_lengths


class TokenCount:
    """Counts input tokens through a module's forward (a pre-hook), while active."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.tokens = 0
        self._h = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _m, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens += int(ids.shape[-1])

    def close(self) -> None:
        self._h.remove()


def plain_forward_s(model: torch.nn.Module, ids: torch.Tensor, rounds: int = 3) -> float:
    """Median seconds of one plain `model(ids)` (all logits) over `rounds`."""
    dev = model.get_input_embeddings().weight.device
    out = []
    with torch.no_grad():
        for _ in range(rounds):
            t0 = time.perf_counter()
            model(input_ids=ids.view(1, -1).to(dev), use_cache=False)
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--lengths", default="256,512,1024,2048")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--methods", default="rtn-w3-g32,magnitude-s50,w8a8")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per design (median)")
    args = p.parse_args()
    lengths = parse_lengths(args.lengths)
    lm = load_model(args.model, "cpu")
    with tempfile.TemporaryDirectory() as cache:
        cfg = RunConfig(
            model=args.model,
            lengths=lengths,
            samples=args.samples,
            device="cpu",
            cache_dir=cache,
            design="both",
        )
        cold = Harness(cfg, lm=lm)
        t0 = time.perf_counter()
        _ = cold.reference, cold.matched_reference
        cold_s = time.perf_counter() - t0
        h = Harness(cfg, lm=lm)  # a second harness: both references from the cache
        t0 = time.perf_counter()
        ref, mref = h.reference, h.matched_reference
        hit_s = time.perf_counter() - t0
        assert ref.cache_hit and mref.cache_hit
        plain_forward_s(lm.model, h.samples[0].ids[: lengths[-1]], 1)  # warm-up
        fwd = plain_forward_s(lm.model, h.samples[0].ids[: lengths[-1]])
        rows = {}
        for mid in args.methods.split(","):
            with h.compressed(mid) as (model, _ctx, _t):
                row = {}
                for design, measure in (("window", h.measure_lengths), ("matched", h.measure_matched)):
                    measure(model, mid)  # warm-up
                    count = TokenCount(decoder_of(model))
                    secs = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        measure(model, mid)
                        secs.append(time.perf_counter() - t0)
                    count.close()
                    n, s = args.samples, statistics.median(secs)
                    row[design] = {
                        "forwards_tokens": count.tokens / (args.repeats * n * lengths[-1]),
                        "s_per_sample": s / n,
                        "time_ratio": s / n / fwd,
                    }
                rows[mid] = row
    out = {
        "model": args.model,
        "lengths": list(lengths),
        "samples": args.samples,
        "target_tokens": h.target,
        "plain_forward_s": fwd,
        "references_cold_s": cold_s,
        "references_cache_hit_s": hit_s,
        "expected_matched_tokens": sum(lengths) / lengths[-1],
        "methods": rows,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
