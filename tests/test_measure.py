"""The KL engine: one pass equals naive, identity is zero, chunking is exact, KL is a true divergence."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import TINY_LENGTHS, tiny_config

from lcc_harness.engines.torch.harness import Harness
from lcc_harness.measure.design import passes_for
from lcc_harness.measure.head import final_hidden, output_head
from lcc_harness.measure.kl import compare, summarize
from lcc_harness.methods.basic import RTN
from lcc_harness.methods.registry import CompressContext

LENGTHS = TINY_LENGTHS


def test_one_pass_equals_naive(tiny):
    one = Harness(tiny_config(), lm=tiny).run("rtn-w3-g32")
    naive = Harness(tiny_config(naive=True), lm=tiny).run("rtn-w3-g32")
    assert one.mode == "one-pass" and naive.mode == "per-length"
    for L in LENGTHS:
        a, b = one.stats[L], naive.stats[L]
        assert a.window_kl > 1e-3  # the comparison below is not between zeros
        for key in ("window_kl", "cumulative_kl", "p99", "max", "dnll"):
            assert abs(getattr(a, key) - getattr(b, key)) <= 1e-5, (L, key)
        assert a.top1 == pytest.approx(b.top1, abs=1e-9)


def test_identity_gives_zero_kl(harness):
    res = harness.run("none")
    for L in LENGTHS:
        s = res.stats[L]
        assert abs(s.window_kl) < 1e-6 and abs(s.cumulative_kl) < 1e-6 and s.max < 1e-6
        assert s.top1 == 1.0 and abs(s.dnll) < 1e-6


def test_compressed_kl_positive_and_matches_float64(harness, tiny):
    model, _, _ = harness.compress("rtn-w3-g32")
    ids = harness.samples[0].ids
    h_ref, h_cmp = final_hidden(tiny.model, ids), final_hidden(model, ids)
    st = compare(output_head(tiny.model), output_head(model), h_ref, h_cmp, ids, chunk=16)
    assert torch.isfinite(st.kl).all()
    assert st.kl.min() >= -1e-6 and st.kl.mean() > 1e-3
    # independent float64 computation of the same definition: KL(P_ref || P_cmp) in nats
    lr = torch.log_softmax(tiny.model.lm_head(h_ref).double(), -1)
    lc = torch.log_softmax(model.lm_head(h_cmp).double(), -1)
    kl64 = (lr.exp() * (lr - lc)).sum(-1)
    torch.testing.assert_close(st.kl.double(), kl64, atol=2e-6, rtol=1e-4)
    nll = -lr[:-1].gather(1, ids[1:, None]).squeeze(1)
    nll_c = -lc[:-1].gather(1, ids[1:, None]).squeeze(1)
    torch.testing.assert_close(st.dnll.double(), nll_c - nll, atol=2e-6, rtol=1e-4)
    assert torch.equal(st.top1, lr.argmax(-1) == lc.argmax(-1))


def test_kl_direction_is_reference_first(tiny):
    head = output_head(tiny.model)
    g = torch.Generator().manual_seed(0)
    h1, h2 = torch.randn(8, 64, generator=g), 3 * torch.randn(8, 64, generator=g)
    ids = torch.zeros(8, dtype=torch.long)
    fwd, bwd = compare(head, head, h1, h2, ids).kl, compare(head, head, h2, h1, ids).kl
    lp1, lp2 = torch.log_softmax(head(h1).double(), -1), torch.log_softmax(head(h2).double(), -1)
    torch.testing.assert_close(fwd.double(), (lp1.exp() * (lp1 - lp2)).sum(-1), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(fwd, bwd, atol=1e-3)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_equals_unchunked(harness, tiny, chunk):
    model, _, _ = harness.compress("rtn-w3-g32")
    ids = harness.samples[1].ids
    h_ref, h_cmp = final_hidden(tiny.model, ids), final_hidden(model, ids)
    whole = compare(output_head(tiny.model), output_head(model), h_ref, h_cmp, ids, chunk=len(ids))
    part = compare(output_head(tiny.model), output_head(model), h_ref, h_cmp, ids, chunk=chunk)
    torch.testing.assert_close(part.kl, whole.kl, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(part.dnll, whole.dnll, atol=2e-6, rtol=1e-5)
    assert torch.equal(part.top1, whole.top1)


def test_positions_do_not_depend_on_later_tokens(tiny):
    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(3))
    long_ = final_hidden(tiny.model, ids)
    short = final_hidden(tiny.model, ids[:40])
    torch.testing.assert_close(long_[:40], short, atol=1e-5, rtol=1e-5)


def test_summary_windows():
    from lcc_harness.measure.kl import PositionStats

    kl = torch.arange(8, dtype=torch.float32)  # position t has KL t
    st = PositionStats(kl, torch.tensor([True] * 4 + [False] * 4), torch.ones(7))
    s = summarize(8, [st])
    assert s.window_kl == pytest.approx((4 + 5 + 6 + 7) / 4)  # positions (L/2, L] = indices 4..7
    assert s.cumulative_kl == pytest.approx(3.5)
    assert s.top1 == 0.0 and s.max == 7.0 and s.dnll == 1.0
    s4 = summarize(4, [st])
    assert s4.window_kl == pytest.approx(2.5) and s4.top1 == 1.0
    assert passes_for([4, 2, 8], True) == {8: (2, 4, 8)}
    assert passes_for([4, 2], False) == {2: (2,), 4: (4,)}


def test_rtn_on_harness_copy_leaves_reference_untouched(harness, tiny):
    before = copy.deepcopy(tiny.model.state_dict())
    model, ctx, _ = harness.compress(RTN(bits=3, group=32))
    assert ctx.info["effective_bits"] == pytest.approx(3 + (16 + 3) / 32)
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(
        model.model.layers[0].mlp.up_proj.weight, tiny.model.model.layers[0].mlp.up_proj.weight
    )
    assert torch.equal(model.lm_head.weight, tiny.model.lm_head.weight)  # LM head not a target by default
    _ = CompressContext()


def test_nonfinite_method_raises(harness):
    from lcc_harness.errors import NonFiniteError

    model, _, _ = harness.compress("none")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite"):
        harness.measure_model(model, "nan-method")
