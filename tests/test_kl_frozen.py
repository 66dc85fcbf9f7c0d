"""Forward KL is bit-for-bit what it was before the informational statistics (reverse KL, Δp) were added.

`frozen_*` below are verbatim copies of `measure.compare`, `measure._lse_` and `measure.compare_summary` as of
commit 015d14c (before issue 13's statistics; only renamed, and the `Head` annotations dropped). The live
functions must return identical per-position KL, top-1 and ΔNLL tensors (torch.equal, not approx) on the tiny
model for several methods, on both measure paths and several chunk sizes: the committed baselines are compared at
1e-5 relative noise, and forward KL may not move at all.
"""

from __future__ import annotations

import pytest
import torch

from lcc_harness.measure.head import (
    RefSummary,
    compare_summary,
    final_hidden,
    linear_head,
    output_head,
    summarize_reference,
)
from lcc_harness.measure.kl import PositionStats, compare

# ---- frozen copy of 015d14c ------------------------------------------------------------------------------
BLOCK_BYTES = 24 * 2**20  # measure.BLOCK_BYTES then
DEFAULT_CHUNK = 256  # options.DEFAULT_CHUNK then


@torch.no_grad()
def frozen_compare(
    ref_head,
    cmp_head,
    h_ref: torch.Tensor,
    h_cmp: torch.Tensor,
    ids: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> PositionStats:
    """Per-position KL, top-1 agreement and ΔNLL from two (T, H) hidden-state tensors of the same ids (T,).

    At most `chunk` positions are in flight at once; on CPU also at most about BLOCK_BYTES per (rows, V)
    float32 block, which the allocator can then reuse instead of mapping fresh pages for every block."""
    T = h_ref.shape[0]
    if h_cmp.shape[0] != T or ids.shape[0] != T:
        raise ValueError(
            f"shape mismatch: ref {tuple(h_ref.shape)}, cmp {tuple(h_cmp.shape)}, ids {tuple(ids.shape)}"
        )
    kl = torch.empty(T, dtype=torch.float32)
    top1 = torch.empty(T, dtype=torch.bool)
    dnll = torch.empty(max(T - 1, 0), dtype=torch.float32)
    bufs: tuple[torch.Tensor, torch.Tensor] | None = None
    s, rows = 0, min(chunk, 8)  # a small first block tells the vocabulary size
    while s < T:
        e = min(T, s + rows)
        z_ref, z_cmp = ref_head(h_ref[s:e]), cmp_head(h_cmp[s:e])  # (c, V) each
        if bufs is None:  # log-probability buffers, reused by every block
            V = z_ref.shape[-1]
            rows = min(chunk, max(1, BLOCK_BYTES // (4 * V))) if z_ref.device.type == "cpu" else chunk
            bufs = tuple(
                torch.empty(max(rows, e - s), V, dtype=torch.float32, device=z_ref.device) for _ in range(2)
            )
        lp_ref = torch.log_softmax(z_ref.float(), dim=-1, out=bufs[0][: e - s])  # (c, V)
        lp_cmp = torch.log_softmax(z_cmp.float(), dim=-1, out=bufs[1][: e - s])  # (c, V)
        del z_ref, z_cmp
        top1[s:e] = (lp_ref.max(dim=-1).indices == lp_cmp.max(dim=-1).indices).cpu()  # first max, = argmax
        te = min(e, T - 1)  # positions with a next token inside the sequence
        if te > s:
            tgt = ids[s + 1 : te + 1].to(lp_ref.device).view(-1, 1)  # (c', 1)
            nll_ref = -lp_ref[: te - s].gather(1, tgt).squeeze(1)
            nll_cmp = -lp_cmp[: te - s].gather(1, tgt).squeeze(1)
            dnll[s:te] = (nll_cmp - nll_ref).cpu()
        # in place, the same arithmetic as (exp(lp_ref) * (lp_ref - lp_cmp)).sum(-1)
        diff = torch.sub(lp_ref, lp_cmp, out=lp_cmp)
        kl[s:e] = diff.mul_(lp_ref.exp_()).sum(dim=-1).cpu()
        s = e
    return PositionStats(kl, top1, dnll)


def frozen_lse_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z (c, V) float32, overwritten with exp(z − max) → (lse (c,) float64, argmax (c,), Σ exp(z − max) (c,))."""
    m, idx = z.max(dim=-1)  # first maximal logit, as argmax
    s = z.sub_(m.unsqueeze(1)).exp_().sum(dim=-1)
    return m.double() + s.double().log(), idx, s


@torch.no_grad()
def frozen_compare_summary(
    ref: RefSummary, cmp_head, h_ref: torch.Tensor, h_cmp: torch.Tensor, ids: torch.Tensor
) -> PositionStats:
    """`compare` against a RefSummary: the same statistics without recomputing the reference logits.

    KL(P_ref ‖ P_cmp) = Σ p_ref·(z_ref − z_cmp) − lse_ref + lse_cmp = (h_ref − h_cmp)·mu − lse_ref + lse_cmp,
    the scalars in float64; only the compared model's logits (float32, in the summary's blocks) are
    computed. `cmp_head` must be the same linear map as the reference's (`shared_linear_head`)."""
    T = h_ref.shape[0]
    if h_cmp.shape[0] != T or ids.shape[0] != T or ref.lse.shape[0] != T:
        raise ValueError(
            f"shape mismatch: ref {tuple(h_ref.shape)}, cmp {tuple(h_cmp.shape)}, ids {tuple(ids.shape)}, "
            f"summary {tuple(ref.lse.shape)}"
        )
    kl = torch.empty(T, dtype=torch.float32)
    top1 = torch.empty(T, dtype=torch.bool)
    dnll = torch.empty(max(T - 1, 0), dtype=torch.float32)
    for s in range(0, T, ref.rows):
        e = min(T, s + ref.rows)
        z = cmp_head(h_cmp[s:e]).float()  # (c, V), a fresh tensor: overwritten below
        te = min(e, T - 1)
        z_next = (
            z[: te - s].gather(1, ids[s + 1 : te + 1].to(z.device).view(-1, 1)).squeeze(1) if te > s else None
        )
        lse, idx, _ = frozen_lse_(z)
        del z
        lse = lse.cpu()
        dh = h_ref[s:e].double() - h_cmp[s:e].to(h_ref.device).double()  # (c, H)
        kl[s:e] = ((dh * ref.mu[s:e].double()).sum(dim=-1) - ref.lse[s:e] + lse).float()
        top1[s:e] = idx.cpu() == ref.argmax[s:e]
        if z_next is not None:
            dnll[s:te] = ((lse[: te - s] - z_next.double().cpu()) - ref.nll[s:te]).float()
    return PositionStats(kl, top1, dnll)


# ---- the checks --------------------------------------------------------------------------------------------
METHODS = ("none", "rtn-w3-g32", "magnitude-s50", "w8a8", "gguf-q4_0")


def _same(new: PositionStats, old: PositionStats) -> None:
    assert torch.equal(new.kl, old.kl)
    assert torch.equal(new.top1, old.top1)
    assert torch.equal(new.dnll, old.dnll)


@pytest.mark.parametrize("method_id", METHODS)
@pytest.mark.parametrize("chunk", [5, DEFAULT_CHUNK])
def test_forward_kl_is_bit_identical_on_both_paths(harness, tiny, method_id, chunk):
    model, _, _ = harness.compress(method_id)
    for s in harness.samples:
        ids = s.ids[:128]
        h_ref, h_cmp = final_hidden(tiny.model, ids), final_hidden(model, ids)
        ref_head, cmp_head = output_head(tiny.model), output_head(model)
        frozen = frozen_compare(ref_head, cmp_head, h_ref, h_cmp, ids, chunk)
        with_rkl = compare(ref_head, cmp_head, h_ref, h_cmp, ids, chunk, reverse=True)
        _same(with_rkl, frozen)  # computing reverse KL beside it leaves forward KL as it was
        without = compare(ref_head, cmp_head, h_ref, h_cmp, ids, chunk)
        _same(without, frozen)
        assert with_rkl.rkl is not None and without.rkl is None
        summ = summarize_reference(tiny.model, h_ref, ids, chunk)
        new = compare_summary(summ, cmp_head, h_ref, h_cmp, ids, linear_head(model))
        _same(new, frozen_compare_summary(summ, cmp_head, h_ref, h_cmp, ids))
        assert new.rkl is not None and new.dp is not None  # the new statistics were computed alongside


def test_the_harness_path_is_bit_identical(harness, tiny):
    """What Harness.measure_model summarizes per sample is the frozen summary path's KL, bit for bit."""
    model, _, _ = harness.compress("rtn-w3-g32")
    ref = harness.reference
    (P,) = ref.passes()
    new = harness._measure_pass(model, output_head(model), ref, P, P, ref.lengths, "rtn-w3-g32", summary=True)
    for i, s in enumerate(ref.samples):
        old = frozen_compare_summary(
            ref.summaries[P][i],
            output_head(model),
            ref.hidden[P][i],
            final_hidden(model, s.ids[:P]),
            s.ids[:P],
        )
        _same(new[i], old)
