"""Forward-KL fingerprint on the tiny model: every per-position KL of a few methods, on both measure paths.

Run before and after a change to the measure (`python bench/kl_fingerprint.py > before.json`, then diff): the
output holds window KL per length at full precision and a sha256 of the per-position KL bytes, so a change of
one ulp anywhere shows up. The tests check the same property against a frozen copy of the KL code
(tests/test_kl_frozen.py); this script is the record of the numbers themselves.
"""

from __future__ import annotations

import hashlib
import json

import torch

from lcc_harness.engines.results import RunConfig
from lcc_harness.engines.torch.harness import Harness
from lcc_harness.models.load import load_model

METHODS = ("none", "rtn-w3-g32", "magnitude-s50", "w8a8", "kv-k4v4")


def fingerprint() -> dict[str, dict[str, object]]:
    """method → path → {window KL per length (repr), sha256 of all per-position KL float32 bytes}."""
    lm = load_model("tiny-llama", "cpu")
    out: dict[str, dict[str, object]] = {}
    for summary in (True, False):
        h = Harness(
            RunConfig(
                model="tiny-llama",
                lengths=(32, 64, 128),
                samples=2,
                device="cpu",
                use_cache=False,
                reference_summary=summary,
            ),
            lm=lm,
        )
        ref = h.reference
        for mid in METHODS:
            model, _, _ = h.compress(mid)
            (P,) = ref.passes()
            head = h.head(model)
            sts = h._measure_pass(model, head, ref, P, P, ref.lengths, mid, summary=summary)
            digest = hashlib.sha256(
                b"".join(s.kl.contiguous().view(torch.uint8).numpy().tobytes() for s in sts)
            )
            stats = h.measure_model(model, mid)
            out.setdefault(mid, {})["summary" if summary else "direct"] = {
                "window_kl": {str(L): repr(s.window_kl) for L, s in stats.items()},
                "kl_sha256": digest.hexdigest(),
            }
    return out


if __name__ == "__main__":
    print(json.dumps(fingerprint(), indent=1, sort_keys=True))
