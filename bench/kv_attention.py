"""One attention layer of kv-k4v4 against a plain causal one, at SmolLM2's shapes (9 query heads, 3 KV heads,
head dim 64, block 64) and 8192 tokens, random inputs, float32 CPU: the general route (one masked sdpa call per
QUERY_CHUNK queries) and the CPU prefill route (an unmasked call over the earlier blocks plus a small masked one,
joined by log-sum-exp) at several PREFILL_CHUNK sizes. The rounds interleave the variants so that a changing CPU
load hits all of them; prints the median seconds and the ratio to the plain layer.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/kv_attention.py [T]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from lcc_harness.methods import kv
from lcc_harness.methods.kv import KVQuant, _make_attention
from lcc_harness.methods.registry import CompressContext
from lcc_harness.models.load import build_tiny_llama

HQ, HKV, D, ROUNDS = 9, 3, 64, 5


def main() -> None:
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, HQ, D, generator=g).transpose(1, 2)  # (B, H, T, D) views, as a model passes them
    k = torch.randn(1, T, HKV, D, generator=g).transpose(1, 2)
    v = torch.randn(1, T, HKV, D, generator=g).transpose(1, 2)
    model = build_tiny_llama()  # only its first attention module is used, as the carrier of the method
    KVQuant(key_bits=4, value_bits=4).apply(model, CompressContext())
    attn = model.model.layers[0].self_attn
    attn.num_key_value_groups = HQ // HKV
    plain_fn, kv_fn = kv._base_function("sdpa", attn), _make_attention("sdpa")

    def run(route: str, chunk: int) -> None:
        kv.LSE_PREFILL, kv.PREFILL_CHUNK = route == "prefill", chunk
        fn = plain_fn if route == "plain" else kv_fn
        fn(attn, q, k, v, None, scaling=D**-0.5, dropout=0.0)

    variants = [("plain", 0), ("general", 0)] + [("prefill", c) for c in (128, 256, 512, 1024)]
    times: dict[tuple[str, int], list[float]] = {x: [] for x in variants}
    for _ in range(ROUNDS):
        for x in variants:
            t0 = time.perf_counter()
            run(*x)
            times[x].append(time.perf_counter() - t0)
    base = statistics.median(times[("plain", 0)])
    print(f"T={T}, {torch.get_num_threads()} threads, median of {ROUNDS} rounds")
    for (route, chunk), ts in times.items():
        label = route + (f" PREFILL_CHUNK={chunk}" if chunk else "")
        print(f"{label:28s} {statistics.median(ts):7.3f} s  {statistics.median(ts) / base:5.2f} × plain")


if __name__ == "__main__":
    main()
