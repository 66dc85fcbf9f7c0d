#!/usr/bin/env python
"""SmolLM2-135M, default-profile samples (4 × 256…2048) on this CPU, float32 and bfloat16: the window KL of the
reference model against itself in separate passes (Harness.self_noise, the number the gate's floor comes from)
and the per-position KL of the length-dependence probe (256-token pass vs the prefix of the 2048-token pass).

    python bench/self_noise.py
"""

from lcc_harness.engines.results import RunConfig
from lcc_harness.engines.torch.harness import Harness
from lcc_harness.measure.kl import compare

for dt in ("float32", "bfloat16"):
    h = Harness(
        RunConfig(
            model="smollm2-135m",
            lengths=(256, 512, 1024, 2048),
            samples=4,
            device="cpu",
            dtype=dt,
            use_cache=False,
        )
    )
    ref = h.reference
    print(dt, "self-noise (max over samples of |window KL|):", h.self_noise())
    P = max(ref.hidden)
    for i, s in enumerate(h.samples):
        st = compare(ref.head, ref.head, ref.hidden[P][i][:256], h._short_reference()[i], s.ids[:256])
        print(
            f"  sample {i}: window KL {float(st.kl[128:256].double().mean()):.3g}, max per-position {float(st.kl.max()):.3g}"
        )
