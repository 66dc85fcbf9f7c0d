"""THE definition of the measure: KL(P_ref ‖ P_cmp) of next-token distributions, in nats, per position.

Log-softmax and KL are computed in float32, in chunks of positions, from the final hidden states, so
no [T, V] logits tensor for a whole sequence ever exists. For a causal model the statistics at
position t do not depend on later tokens, so one pass at the longest length yields every shorter
length's curve; `passes_for` decides when that holds (see `length_dependence`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lcc_harness.errors import NonFiniteError
from lcc_harness.options import DEFAULT_CHUNK  # one definition, shared with the option table

# CPU: positions per block are capped so that one (rows, V) float32 block stays below glibc's largest
# mmap threshold (32 MiB): blocks are then reused from the heap instead of page-faulted in afresh.
BLOCK_BYTES = 24 * 2**20


Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PositionStats:
    """Per-position statistics of one sample over one forward pass of T tokens."""

    kl: torch.Tensor  # (T,) float32, nats
    top1: torch.Tensor  # (T,) bool, argmax of both distributions equal
    dnll: torch.Tensor  # (T-1,) float32, NLL_cmp - NLL_ref of token t+1 predicted at position t
    # informational (never gated): reverse KL(P_cmp ‖ P_ref), and p_cmp − p_ref of token t+1 at position t;
    # None where a caller did not compute them (compare_summary without the compared model's head)
    rkl: torch.Tensor | None = None  # (T,) float32, nats
    dp: torch.Tensor | None = None  # (T-1,) float32, probability


DP_QUANTILES = (0.01, 0.05, 0.5, 0.95, 0.99)  # the Δp percentiles LengthStats reports (dp_p01 … dp_p99)


@dataclass
class LengthStats:
    """Summary at context length L. Window = positions (L/2, L] (0-based [L//2, L)); cumulative = [0, L).

    Quantiles, top-1 and ΔNLL are over the window, pooled across samples; per_sample holds one value
    per sample for window_kl, cumulative_kl, top1 and dnll (for confidence intervals), and for reverse_kl and
    dp_mean when they were computed.

    Informational statistics (llama.cpp's `perplexity --kl-divergence` block; never gated, never in baselines),
    over the same window positions, pooled: reverse_kl = mean KL(P_cmp ‖ P_ref) (None when not computed);
    top1_se = the binomial standard error sqrt(top1·(1 − top1)/n) of top1 over the n pooled positions, which
    treats positions as independent (they are not: neighbouring positions share context, so it understates the
    spread between texts; the per-sample top1 values show that spread); Δp = p_cmp − p_ref of the actual next
    token: dp_mean, dp_rms and the percentiles dp_p01 … dp_p99 (DP_QUANTILES).
    """

    length: int
    window_kl: float
    cumulative_kl: float
    p50: float
    p90: float
    p99: float
    max: float
    top1: float
    dnll: float
    per_sample: dict[str, list[float]] = field(default_factory=dict)
    reverse_kl: float | None = None
    top1_se: float | None = None
    dp_mean: float | None = None
    dp_rms: float | None = None
    dp_p01: float | None = None
    dp_p05: float | None = None
    dp_p50: float | None = None
    dp_p95: float | None = None
    dp_p99: float | None = None
    # llama.cpp's statistics block (`statistics_block`) over the same window, pooled; informational
    stats: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# the percentiles of llama-perplexity's KL-divergence block: key → fraction (linear interpolation between order
# statistics, as its `percentile`; the median is the same interpolation at 0.5)
BLOCK_QUANTILES = (
    ("p99.9", 0.999),
    ("p99", 0.99),
    ("p95", 0.95),
    ("p90", 0.90),
    ("median", 0.5),
    ("p10", 0.10),
    ("p5", 0.05),
    ("p1", 0.01),
    ("p0.1", 0.001),
)


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    """(mean, standard error) as llama-perplexity computes them: sqrt((E[x²] − E[x]²) / (n − 1)), 0 for n ≤ 10.
    It treats positions as independent (they are not: neighbours share context), so it understates the spread
    between texts; the per-sample values (LengthStats.per_sample) show that spread."""
    x = x.double()
    n = x.numel()
    if n == 0:
        return math.nan, math.nan
    mean = float(x.mean())
    var = float(x.square().mean()) - mean * mean
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def _spread(x: torch.Tensor) -> dict[str, float]:
    """mean ± SE, max, the BLOCK_QUANTILES and min of x (pooled values)."""
    x = x.double()
    mean, se = _mean_se(x)
    qs = torch.quantile(x, torch.tensor([q for _, q in BLOCK_QUANTILES], dtype=torch.float64)).tolist()
    return {
        "mean": mean,
        "se": se,
        "max": float(x.max()),
        **{k: v for (k, _), v in zip(BLOCK_QUANTILES, qs, strict=True)},
        "min": float(x.min()),
    }


def statistics_block(
    kl: torch.Tensor, top1: torch.Tensor, dp: torch.Tensor, dnll: torch.Tensor
) -> dict[str, Any] | None:
    """llama-perplexity's `--kl-divergence` statistics from pooled per-position values: kl (n,) nats, top1 (n,)
    bool, dp (m,) = p_cmp − p_ref of the next token, dnll (m,) = NLL_cmp − NLL_ref. Keys: kld {mean, se, max,
    p99.9 … p0.1, median, min}; delta_p {the same, rms, rms_se}; same_top_p {mean, se}; ppl_ratio =
    exp(mean ΔNLL) = PPL(cmp)/PPL(ref). None when no position has a next token."""
    if kl.numel() == 0 or dp.numel() == 0:
        return None
    p = float(top1.double().mean())
    n = top1.numel()
    sq_mean, sq_se = _mean_se(dp.double().square())
    rms = math.sqrt(sq_mean)
    return {
        "kld": _spread(kl),
        "delta_p": {**_spread(dp), "rms": rms, "rms_se": 0.5 / rms * sq_se if rms > 0 else 0.0},
        "same_top_p": {"mean": p, "se": math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0},
        "ppl_ratio": math.exp(float(dnll.double().mean())),
    }


@torch.no_grad()
def compare(
    ref_head: Head,
    cmp_head: Head,
    h_ref: torch.Tensor,
    h_cmp: torch.Tensor,
    ids: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
    reverse: bool = False,
) -> PositionStats:
    """Per-position KL, top-1 agreement and ΔNLL from two (T, H) hidden-state tensors of the same ids (T,);
    also reverse KL(P_cmp ‖ P_ref) when `reverse` (else `rkl` is None; forward KL is the same either way).

    ids may also hold T + 1 tokens: then the last position's next token is known too (a block of a longer
    sequence: the llama.cpp engine compares logits one micro-batch at a time, with `identity_head`), and ΔNLL
    and Δp have T entries instead of T − 1.

    At most `chunk` positions are in flight at once; on CPU also at most about BLOCK_BYTES per (rows, V)
    float32 block, which the allocator can then reuse instead of mapping fresh pages for every block."""
    T = h_ref.shape[0]
    if h_cmp.shape[0] != T or ids.shape[0] not in (T, T + 1):
        raise ValueError(
            f"shape mismatch: ref {tuple(h_ref.shape)}, cmp {tuple(h_cmp.shape)}, ids {tuple(ids.shape)}"
        )
    n_next = min(T, ids.shape[0] - 1) if T else 0  # positions whose next token is known
    kl = torch.empty(T, dtype=torch.float32)
    top1 = torch.empty(T, dtype=torch.bool)
    dnll = torch.empty(max(n_next, 0), dtype=torch.float32)
    rkl = torch.empty(T, dtype=torch.float32) if reverse else None
    dp = torch.empty(max(n_next, 0), dtype=torch.float32)
    bufs: tuple[torch.Tensor, ...] | None = None
    s, rows = 0, min(chunk, 8)  # a small first block tells the vocabulary size
    while s < T:
        e = min(T, s + rows)
        z_ref, z_cmp = ref_head(h_ref[s:e]), cmp_head(h_cmp[s:e])  # (c, V) each
        if bufs is None:  # log-probability buffers, reused by every block
            V = z_ref.shape[-1]
            rows = min(chunk, max(1, BLOCK_BYTES // (4 * V))) if z_ref.device.type == "cpu" else chunk
            bufs = tuple(
                torch.empty(max(rows, e - s), V, dtype=torch.float32, device=z_ref.device)
                for _ in range(3 if reverse else 2)
            )
        lp_ref = torch.log_softmax(z_ref.float(), dim=-1, out=bufs[0][: e - s])  # (c, V)
        lp_cmp = torch.log_softmax(z_cmp.float(), dim=-1, out=bufs[1][: e - s])  # (c, V)
        del z_ref, z_cmp
        top1[s:e] = (lp_ref.max(dim=-1).indices == lp_cmp.max(dim=-1).indices).cpu()  # first max, = argmax
        te = min(e, n_next)  # positions with a next token inside the sequence
        if te > s:
            tgt = ids[s + 1 : te + 1].to(lp_ref.device).view(-1, 1)  # (c', 1)
            nll_ref = -lp_ref[: te - s].gather(1, tgt).squeeze(1)
            nll_cmp = -lp_cmp[: te - s].gather(1, tgt).squeeze(1)
            dnll[s:te] = (nll_cmp - nll_ref).cpu()
            dp[s:te] = (torch.exp(-nll_cmp.double()) - torch.exp(-nll_ref.double())).float().cpu()
        if rkl is not None:  # p_cmp is read before lp_cmp is overwritten by diff below
            p_cmp = torch.exp(lp_cmp, out=bufs[2][: e - s])  # (c, V)
        # in place, the same arithmetic as (exp(lp_ref) * (lp_ref - lp_cmp)).sum(-1)
        diff = torch.sub(lp_ref, lp_cmp, out=lp_cmp)
        if rkl is not None:  # Σ p_cmp·(lp_cmp − lp_ref); diff is not changed
            rkl[s:e] = p_cmp.mul_(diff).sum(dim=-1).neg_().cpu()
        kl[s:e] = diff.mul_(lp_ref.exp_()).sum(dim=-1).cpu()
        s = e
    return PositionStats(kl, top1, dnll, rkl, dp)


def identity_head(z: torch.Tensor) -> torch.Tensor:
    """The head of an engine that returns logits itself (llama.cpp): `compare` then reads logits as given."""
    return z


def cat_stats(blocks: Sequence[PositionStats]) -> PositionStats:
    """One sequence's PositionStats from its consecutive blocks (each compared with its next token known, as
    `compare` does for ids of T + 1 tokens; the last block may lack it)."""

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(b, name) for b in blocks]
        return None if any(x is None for x in parts) else torch.cat(parts)

    return PositionStats(cat("kl"), cat("top1"), cat("dnll"), cat("rkl"), cat("dp"))


def summarize(length: int, stats: Sequence[PositionStats], lo: int | None = None) -> LengthStats:
    """LengthStats at `length` from per-sample PositionStats covering at least `length` positions; the window is
    positions [lo, length), by default [length // 2, length). `summarize(T, sts, lo=0)` summarizes every position
    of T-position stats (the matched-target curves: `matched_ids`)."""
    lo = length // 2 if lo is None else lo
    win_kl = [s.kl[lo:length] for s in stats]
    cum_kl = [s.kl[:length] for s in stats]
    win_top1 = [s.top1[lo:length].float() for s in stats]
    win_dnll = [s.dnll[lo : length - 1] for s in stats]
    pooled = torch.cat(win_kl).double()
    q = torch.quantile(pooled, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    per = {
        "window_kl": [float(x.double().mean()) for x in win_kl],
        "cumulative_kl": [float(x.double().mean()) for x in cum_kl],
        "top1": [float(x.double().mean()) for x in win_top1],
        "dnll": [float(x.double().mean()) if x.numel() else 0.0 for x in win_dnll],
    }
    all_dnll = torch.cat(win_dnll).double()
    all_top1 = torch.cat(win_top1).double()
    top1 = float(all_top1.mean())
    extra: dict[str, Any] = {"top1_se": math.sqrt(max(top1 * (1 - top1), 0.0) / all_top1.numel())}
    if all(s.rkl is not None for s in stats):
        win_rkl = [s.rkl[lo:length] for s in stats]
        per["reverse_kl"] = [float(x.double().mean()) for x in win_rkl]
        extra["reverse_kl"] = float(torch.cat(win_rkl).double().mean())
    if all(s.dp is not None for s in stats):
        win_dp = [s.dp[lo : length - 1] for s in stats]
        per["dp_mean"] = [float(x.double().mean()) if x.numel() else 0.0 for x in win_dp]
        dp = torch.cat(win_dp).double()
        if dp.numel():
            qs = torch.quantile(dp, torch.tensor(DP_QUANTILES, dtype=torch.float64)).tolist()
            extra |= {"dp_mean": float(dp.mean()), "dp_rms": float(dp.square().mean().sqrt())}
            extra |= {f"dp_p{round(100 * a):02d}": v for a, v in zip(DP_QUANTILES, qs, strict=True)}
            extra["stats"] = statistics_block(pooled, torch.cat(win_top1) > 0.5, dp, all_dnll)
    return LengthStats(
        length=length,
        window_kl=float(pooled.mean()),
        cumulative_kl=float(torch.cat(cum_kl).double().mean()),
        p50=q[0],
        p90=q[1],
        p99=q[2],
        max=float(pooled.max()),
        top1=top1,
        dnll=float(all_dnll.mean()) if all_dnll.numel() else 0.0,
        per_sample=per,
        **extra,
    )


def check_finite(method_id: str, length: int, sample: int, st: PositionStats) -> None:
    """Raise NonFiniteError when any KL or ΔNLL at positions < length is NaN or Inf."""
    bad = ~torch.isfinite(st.kl[:length])
    bad_nll = ~torch.isfinite(st.dnll[: max(length - 1, 0)])
    if bool(bad.any()) or bool(bad_nll.any()):
        pos = int(bad.nonzero()[0]) if bool(bad.any()) else int(bad_nll.nonzero()[0])
        raise NonFiniteError(
            f"method '{method_id}' produced non-finite output at length {length} (sample {sample}, "
            f"first at position {pos}); the compressed weights or activations hold NaN/Inf"
        )
