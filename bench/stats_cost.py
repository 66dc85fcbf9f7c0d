"""What reverse KL adds to the summary path: compare_summary with and without the compared head, at SmolLM2's
head size (vocabulary 49152, hidden 576), random weights, float32 CPU. Prints seconds per 1000 positions."""

from __future__ import annotations

import time

import torch
from torch import nn

from lcc_harness.measure.head import compare_summary, output_head, summarize_reference

V, H, T = 49152, 576, 1024


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = type("C", (), {})()
        self.lm_head = nn.Linear(H, V, bias=False)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head


def main() -> None:
    g = torch.Generator().manual_seed(0)
    model = Head()
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(V, H, generator=g) * 0.05)
    h_ref = torch.randn(T, H, generator=g)
    h_cmp = h_ref + 0.1 * torch.randn(T, H, generator=g)
    ids = torch.randint(0, V, (T,), generator=g)
    summ = summarize_reference(model, h_ref, ids)
    head = output_head(model)
    lin = (model.lm_head.weight, None, 1.0)
    for label, arg in (("forward KL, Δp", None), ("+ reverse KL", lin)) * 2:
        t0 = time.perf_counter()
        compare_summary(summ, head, h_ref, h_cmp, ids, arg)
        print(f"{label:16s} {1000 * (time.perf_counter() - t0) / T:.3f} s per 1000 positions")


if __name__ == "__main__":
    main()
