"""What the error anatomy costs: one forward of the model at the longest length, plain, while capturing the
reference's activations (`anatomy.capture`) and while comparing with them (`ErrorTally.compare_to`, what rides on
the window measurement's pass of each anatomy sample). Medians of --repeats, interleaved.

The anatomy adds (compare − plain) per anatomy sample to a method's measurement, which costs at least one plain
forward per measured sample; `bound` is that cost over `samples` plain forwards (an upper bound on the share it adds,
since the measurement also runs the LM head, the KL and a length probe). The capture runs once per run.

    python bench/anatomy_cost.py [--model tiny-llama] [--length 2048] [--samples 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lcc_harness.measure.anatomy import ErrorTally, capture
from lcc_harness.measure.head import final_hidden
from lcc_harness.models.corpus import TokenizedCorpus, load_corpus
from lcc_harness.models.load import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument(
        "--samples", type=int, default=4, help="samples a method's measurement runs (the profile's)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(args.model, "cpu")
    ids = TokenizedCorpus(load_corpus(None), lm.tokenizer).draw(1, args.length, 0)[0].ids
    model = lm.model
    final_hidden(model, ids[:64])  # warm-up
    with capture(model) as ref:
        final_hidden(model, ids)
    times: dict[str, list[float]] = {"plain": [], "capture": [], "compare": []}
    for _ in range(args.repeats):
        for what in times:
            t0 = time.perf_counter()
            if what == "plain":
                final_hidden(model, ids)
            elif what == "capture":
                with capture(model):
                    final_hidden(model, ids)
            else:
                with ErrorTally([ref]).compare_to(model, 0):
                    final_hidden(model, ids)
            times[what].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    mb = sum(t.numel() * t.element_size() for ts in ref.values() for t in ts) / 2**20
    print(
        json.dumps(
            {
                "model": args.model,
                "length": args.length,
                "median_s": med,
                "all_s": times,
                "compare_over_plain": med["compare"] / med["plain"],
                "capture_over_plain": med["capture"] / med["plain"],
                "bound_share_of_measurement": (med["compare"] - med["plain"]) / (args.samples * med["plain"]),
                "reference_mb_per_sample": mb,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
