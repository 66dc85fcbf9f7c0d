#!/usr/bin/env python
"""SmolLM2-135M in bf16, rtn-w8-g64: window KL of the harness (summary path and direct path, float32 head) vs a
float64 computation from the same bf16 hidden states; and the old bf16-head summary path for comparison."""

import copy

import numpy as np
import torch

from lcc_harness.measure.head import compare_summary, final_hidden, output_head, summarize_reference
from lcc_harness.measure.kl import compare
from lcc_harness.methods import CompressContext, parse_method
from lcc_harness.models.corpus import TokenizedCorpus, load_corpus
from lcc_harness.models.load import load_model

lm = load_model("smollm2-135m", "cpu", "bfloat16")
ref = lm.model
cmp = parse_method("rtn-w8-g64").apply(copy.deepcopy(ref), CompressContext())
tc = TokenizedCorpus(load_corpus(None), lm.tokenizer)
L = 1024
res = []
for s in tc.draw(2, L, 0):
    ids = s.ids[:L]
    h_r, h_c = final_hidden(ref, ids), final_hidden(cmp, ids)
    summ = summarize_reference(ref, h_r, ids, 256)
    k_sum = compare_summary(summ, output_head(cmp), h_r, h_c, ids).kl
    k_dir = compare(output_head(ref), output_head(cmp), h_r, h_c, ids).kl

    def old_head(m):
        return lambda h: m.get_output_embeddings()(h.to(torch.bfloat16))

    k_old = compare_summary(summ, old_head(cmp), h_r, h_c, ids).kl
    W = ref.get_output_embeddings().weight.double()
    ex = []
    for a in range(L // 2, L, 128):
        lr = torch.log_softmax(h_r[a : a + 128].double() @ W.T, -1)
        lc = torch.log_softmax(h_c[a : a + 128].double() @ W.T, -1)
        ex.append((lr.exp() * (lr - lc)).sum(-1))
    ex = torch.cat(ex)
    w = slice(L // 2, L)
    res.append(
        [
            float(k_sum[w].double().mean()),
            float(k_dir[w].double().mean()),
            float(ex.mean()),
            float(k_old[w].double().mean()),
            float(k_sum.min()),
            float(k_old.min()),
        ]
    )
    print(s.span.start, res[-1], flush=True)
m = np.mean(res, 0)
print(
    f"window KL at {L} (2 samples): summary {m[0]:.6f}  direct {m[1]:.6f}  float64 {m[2]:.6f}  old bf16-head summary {m[3]:.6f}; min per-position KL new {min(r[4] for r in res):.3g} old {min(r[5] for r in res):.3g}"
)
