"""The reference cache: hits equal recomputation; corrupt or stale entries are recomputed."""

from __future__ import annotations

import pytest
import torch

from lcc_harness.measure.reference import build_reference
from lcc_harness.models.corpus import TokenizedCorpus, default_corpus

LENGTHS = (32, 64)


@pytest.fixture(scope="module")
def samples(tiny):
    return TokenizedCorpus(default_corpus(), tiny.tokenizer).draw(2, 64, seed=0)


def _equal(a, b):
    assert a.keys() == b.keys()
    for P in a:
        for x, y in zip(a[P], b[P], strict=True):
            assert torch.equal(x, y)


def test_cache_hit_equals_recompute(tiny, samples, cache_dir):
    first = build_reference(tiny, samples, LENGTHS, cache_dir=cache_dir)
    second = build_reference(tiny, samples, LENGTHS, cache_dir=cache_dir)
    fresh = build_reference(tiny, samples, LENGTHS, use_cache=False)
    assert not first.cache_hit and second.cache_hit
    _equal(second.hidden, fresh.hidden)
    assert len(list(cache_dir.glob("ref-*.safetensors"))) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_cache_entry_is_recomputed(tiny, samples, cache_dir, damage):
    build_reference(tiny, samples, LENGTHS, cache_dir=cache_dir)
    (path,) = cache_dir.glob("ref-*.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-10] ^= 0xFF  # inside tensor data: only the checksum can notice
    else:
        data = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="unusable"):
        again = build_reference(tiny, samples, LENGTHS, cache_dir=cache_dir)
    assert not again.cache_hit
    _equal(again.hidden, build_reference(tiny, samples, LENGTHS, use_cache=False).hidden)
    assert build_reference(tiny, samples, LENGTHS, cache_dir=cache_dir).cache_hit  # rewritten


def test_stale_entry_not_used_when_model_changes(tiny, samples, cache_dir):
    import copy

    build_reference(tiny, samples, LENGTHS, cache_dir=cache_dir)
    other = copy.copy(tiny)
    other.model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        other.model.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    ref = build_reference(other, samples, LENGTHS, cache_dir=cache_dir)
    assert not ref.cache_hit
    assert len(list(cache_dir.glob("ref-*.safetensors"))) == 2


def test_different_samples_different_key(tiny, samples, cache_dir):
    a = build_reference(tiny, samples, LENGTHS, cache_dir=cache_dir)
    b = build_reference(tiny, samples[:1], LENGTHS, cache_dir=cache_dir)
    assert a.key != b.key and not b.cache_hit


def test_length_dependent_model_is_measured_per_length(tiny, samples):
    import copy

    other = copy.copy(tiny)
    other.model = copy.deepcopy(tiny.model)
    other.model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.warns(UserWarning, match="per length"):
        ref = build_reference(other, samples, LENGTHS, use_cache=False)
    assert not ref.one_pass and sorted(ref.hidden) == list(LENGTHS)


CONCURRENT = """
import json, os, sys, time
import lcc_harness.measure.reference as reference
from lcc_harness.models.corpus import TokenizedCorpus, default_corpus
from lcc_harness.models.load import load_model

lm = load_model("tiny-llama", "cpu")
samples = TokenizedCorpus(default_corpus(), lm.tokenizer).draw(2, 64, seed=0)
_final = reference.final_hidden

def slow_final(model, ids):  # a slow reference: the other process must wait for it, not compute its own
    with open(sys.argv[2], "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(0.2)
    return _final(model, ids)

reference.final_hidden = slow_final
open(sys.argv[3], "w").close()  # ready
while not os.path.exists(sys.argv[4]):  # start together
    time.sleep(0.01)
ref = reference.build_reference(lm, samples, (32, 64), cache_dir=sys.argv[1])
print(json.dumps({"hit": ref.cache_hit, "key": ref.key}))
"""


@pytest.mark.slow
def test_concurrent_processes_compute_one_reference_once(tmp_path):
    """Two processes asking for the same cache entry at once: one computes, the other waits and reads it."""
    import json
    import subprocess
    import sys
    import time

    log, go = tmp_path / "computed.log", tmp_path / "go"
    script = tmp_path / "ref.py"
    script.write_text(CONCURRENT)
    procs = []
    for i in range(2):
        ready = tmp_path / f"ready{i}"
        args = [sys.executable, str(script), str(tmp_path / "cache"), str(log), str(ready), str(go)]
        procs.append((subprocess.Popen(args, stdout=subprocess.PIPE, text=True), ready))
    t0 = time.monotonic()
    while not all(r.exists() for _, r in procs):
        assert time.monotonic() - t0 < 120
        time.sleep(0.02)
    go.touch()
    outs = [json.loads(p.communicate(timeout=180)[0].strip().splitlines()[-1]) for p, _ in procs]
    assert sorted(o["hit"] for o in outs) == [False, True]
    assert outs[0]["key"] == outs[1]["key"]
    assert len(set(log.read_text().split())) == 1  # every reference forward ran in one process
