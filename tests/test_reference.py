"""The reference cache: hits equal recomputation; corrupt or stale entries are recomputed."""

from __future__ import annotations

import pytest
import torch

from lcc_harness.corpus import TokenizedCorpus, default_corpus
from lcc_harness.reference import build_reference

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
