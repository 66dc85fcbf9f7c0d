"""llama-perplexity's KLD design with the llama.cpp engine's own reference (docs/engines.md, "Against llama.cpp's
own statistics"): the tokens and chunks of a --kl-divergence-base file, the reference and compressed GGUFs run in
lock-step, KL from both float32 logits.

    python bench/kld_compare.py BASE.kld REF.gguf COMPRESSED.gguf [KV-TYPE, default f16]
"""

import sys
from pathlib import Path

from lcc_harness.engines.llamacpp.binding import binding
from lcc_harness.engines.llamacpp.kld_base import engine_chunk_kld, read_kld_base

binding()
b = read_kld_base(sys.argv[1])
kv = sys.argv[4] if len(sys.argv) > 4 else "f16"
out = engine_chunk_kld(b.tokens, Path(sys.argv[2]), Path(sys.argv[3]), kv=kv, threads=2)
s = out["stats"]
print(
    f"engine reference: mean KLD {s['kld']['mean']:.6f} ± {s['kld']['se']:.6f}, same top p "
    f"{100 * s['same_top_p']['mean']:.3f} %, PPL ratio {s['ppl_ratio']:.6f}, {out['positions']} positions"
)
