"""The reference summary (RefSummary): the default measurement path for models that keep the reference's LM
head. It must give the statistics of the direct path (`compare`), be cached with the reference, and step
aside for models whose head differs."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import TINY_LENGTHS, tiny_config

from lcc_harness.engines.torch.harness import Harness
from lcc_harness.measure.head import (
    compare_summary,
    final_hidden,
    output_head,
    shared_linear_head,
    summarize_reference,
    summary_rows,
)
from lcc_harness.measure.kl import compare
from lcc_harness.measure.reference import build_reference

LENGTHS = TINY_LENGTHS


@pytest.mark.parametrize("chunk", [1, 5, 256])
def test_summary_matches_float64_definition(harness, tiny, chunk):
    model, _, _ = harness.compress("rtn-w3-g32")
    ids = harness.samples[0].ids
    h_ref, h_cmp = final_hidden(tiny.model, ids), final_hidden(model, ids)
    summ = summarize_reference(tiny.model, h_ref, ids, chunk)
    st = compare_summary(summ, output_head(model), h_ref, h_cmp, ids)
    lr = torch.log_softmax(tiny.model.lm_head(h_ref).double(), -1)
    lc = torch.log_softmax(model.lm_head(h_cmp).double(), -1)
    kl64 = (lr.exp() * (lr - lc)).sum(-1)
    assert float(kl64.mean()) > 1e-3  # not a comparison between zeros
    torch.testing.assert_close(st.kl.double(), kl64, atol=2e-6, rtol=1e-4)
    nll = -lr[:-1].gather(1, ids[1:, None]).squeeze(1)
    nll_c = -lc[:-1].gather(1, ids[1:, None]).squeeze(1)
    torch.testing.assert_close(st.dnll.double(), nll_c - nll, atol=2e-6, rtol=1e-4)
    assert torch.equal(st.top1, lr.argmax(-1) == lc.argmax(-1))


def test_summary_prefix_equals_short_summary(harness, tiny):
    ids = harness.samples[1].ids
    h = final_hidden(tiny.model, ids)
    full = summarize_reference(tiny.model, h, ids, 16).prefix(40)
    short = summarize_reference(tiny.model, h[:40], ids[:40], 16)
    for f in ("mu", "lse", "argmax", "nll"):
        torch.testing.assert_close(getattr(full, f), getattr(short, f), atol=1e-6, rtol=1e-6)


def test_identical_model_gives_exactly_zero(harness):
    res = harness.run("none")
    assert res.timings["reference_cache_hit"] is False
    for s in res.stats.values():
        assert s.window_kl == 0.0 and s.max == 0.0 and s.dnll == 0.0 and s.top1 == 1.0


def test_default_and_direct_paths_agree(tiny):
    fast = Harness(tiny_config(), lm=tiny)
    exact = Harness(tiny_config(reference_summary=False), lm=tiny)
    assert fast.reference.summaries and not exact.reference.summaries
    a, b = fast.run("rtn-w3-g32"), exact.run("rtn-w3-g32")
    for L in LENGTHS:
        assert a.stats[L].window_kl > 1e-3
        for key in ("window_kl", "cumulative_kl", "p99", "max", "dnll"):
            assert getattr(a.stats[L], key) == pytest.approx(getattr(b.stats[L], key), rel=1e-4, abs=1e-6), (
                key
            )
        assert a.stats[L].top1 == b.stats[L].top1


def test_summary_is_used_only_when_the_head_is_shared(harness, tiny, monkeypatch):
    """A method that changes the LM head must be compared directly: the summary holds the reference's head."""
    model, _, _ = harness.compress("none")
    assert shared_linear_head(tiny.model, model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # a "compressed" head: sharper distributions, KL > 0
    assert not shared_linear_head(tiny.model, model)
    used = []
    import lcc_harness.engines.torch.curves as run_mod

    for name in ("compare", "compare_summary"):
        fn = getattr(run_mod, name)
        monkeypatch.setattr(
            run_mod, name, lambda *a, _fn=fn, _n=name, **k: (used.append(_n), _fn(*a, **k))[1]
        )
    stats = harness.measure_model(model, "scaled-head")
    assert set(used) == {"compare"}
    ids = harness.samples[0].ids[: LENGTHS[-1]]
    h_ref = final_hidden(tiny.model, ids)
    direct = compare(output_head(tiny.model), output_head(model), h_ref, final_hidden(model, ids), ids)
    assert stats[LENGTHS[-1]].per_sample["window_kl"][0] == pytest.approx(
        float(direct.kl[LENGTHS[-1] // 2 :].double().mean()), rel=1e-6
    )
    assert stats[LENGTHS[-1]].window_kl > 1e-3


def test_summaries_are_cached_with_the_reference(tiny, cache_dir):
    samples = Harness(tiny_config(), lm=tiny).samples
    cold = build_reference(tiny, samples, LENGTHS, cache_dir=cache_dir, summary_chunk=16)
    hit = build_reference(tiny, samples, LENGTHS, cache_dir=cache_dir, summary_chunk=16)
    assert not cold.cache_hit and hit.cache_hit
    assert cold.summaries and set(hit.summaries) == set(cold.summaries)
    for P in cold.summaries:
        for a, b in zip(cold.summaries[P], hit.summaries[P], strict=True):
            assert a.rows == b.rows == summary_rows(tiny.model, 16)
            for f in ("mu", "lse", "argmax", "nll"):
                assert torch.equal(getattr(a, f), getattr(b, f)), f
    # other blocks, or no summary, are other entries: never a summary of the wrong shape
    other = build_reference(tiny, samples, LENGTHS, cache_dir=cache_dir, summary_chunk=8)
    none = build_reference(tiny, samples, LENGTHS, cache_dir=cache_dir, summary_chunk=None)
    assert not other.cache_hit and not none.cache_hit and not none.summaries
    assert next(iter(other.summaries.values()))[0].rows == 8


def test_head_without_plain_linear_gets_no_summary(tiny):
    model = copy.deepcopy(tiny.model)
    model.config.final_logit_softcapping = 30.0
    assert summary_rows(model, 16) == 0
    with pytest.raises(ValueError, match="not a plain linear map"):
        summarize_reference(model, torch.zeros(4, 64), torch.zeros(4, dtype=torch.long))
