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
import torch.nn.functional as F
from torch import nn

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


def head_transform(model: nn.Module) -> tuple[float, float | None]:
    """(scale, soft-cap) that the model's forward applies to `lm_head(h)`, read from its config.

    Known families: Cohere `logit_scale` (×), Granite `logits_scaling` (÷), FalconH1 `lm_head_multiplier` (×),
    Gemma-2/3 `final_logit_softcapping` (cap·tanh(z/cap)). Anything else is assumed to be a plain head; the
    harness checks that against the model's own logits before measuring (`check_head`)."""
    cfg = model.config
    scale = 1.0
    if getattr(cfg, "logit_scale", None):
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None):
        scale /= float(cfg.logits_scaling)
    if getattr(cfg, "lm_head_multiplier", None):
        scale *= float(cfg.lm_head_multiplier)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


def output_head(model: nn.Module, weights: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> Head:
    """hidden (..., H) → float32 logits (..., V), as the model's forward would produce them but without its
    rounding: the head's weight is upcast to float32 once (kept by the returned function), the hidden states per
    call, so KL never sees bf16/fp16-rounded logits. `weights` (weight, bias): a plain linear head with these
    instead of the model's (the reference's own head when a method changed it in place)."""
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (LM head)")
    scale, softcap = head_transform(model)
    plain = weights is not None or _plain_linear(head)
    cache: dict[str, torch.Tensor | None] = {}
    if weights is not None:
        cache["w"], cache["b"] = weights[0].float(), None if weights[1] is None else weights[1].float()

    def apply(h: torch.Tensor) -> torch.Tensor:
        if plain:
            if "w" not in cache:
                cache["w"] = head.weight.float()  # (V, H): the same tensor when already float32
                cache["b"] = None if head.bias is None else head.bias.float()
            logits = F.linear(h.to(head.weight.device, torch.float32), cache["w"], cache["b"])  # (..., V)
        else:  # a replaced, wrapped or hooked head: its own forward (hooks run), upcast after
            logits = head(h.to(head.weight.device, head.weight.dtype)).float()
        if scale != 1.0:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply


def own_logits_head(model: nn.Module) -> Head:
    """hidden (c, H) → logits (c, V) from the model's own forward: its decoder is swapped, for the call, for a stub
    that returns `h`, so whatever the family does after its decoder (scaling, capping, …) is applied. Used for
    families whose head `output_head` does not reproduce; logits are then rounded to the model's dtype."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    prefix = getattr(model, "base_model_prefix", "model")
    body = getattr(model, prefix, None)
    if not isinstance(body, nn.Module):
        raise TypeError(f"{type(model).__name__} has no decoder attribute '{prefix}'")
    dev = model.get_input_embeddings().weight.device

    class _Stub(nn.Module):
        """Stands in for the decoder: returns the given hidden states; other attributes come from the decoder."""

        def __init__(self, h: torch.Tensor) -> None:
            super().__init__()
            self.h = h

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(body, name)

        def forward(self, *args: Any, **kwargs: Any) -> BaseModelOutputWithPast:
            return BaseModelOutputWithPast(last_hidden_state=self.h)

    @torch.no_grad()
    def apply(h: torch.Tensor) -> torch.Tensor:
        stub = _Stub(h.to(dev, body_dtype(body)).unsqueeze(0))  # (1, c, H)
        ids = torch.zeros(1, h.shape[0], dtype=torch.long, device=dev)
        model._modules[prefix] = stub
        try:
            out = model(input_ids=ids, use_cache=False)
        finally:
            model._modules[prefix] = body
        return out.logits[0].float()  # (c, V)

    return apply


def body_dtype(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.float32


HEAD_PROBE = 32  # tokens of the probe that checks a head against the model's own logits


@torch.no_grad()
def check_head(model: nn.Module, ids: torch.Tensor) -> str | None:
    """None when `output_head(model)` reproduces `model(ids).logits` on a short probe; else a note saying that the
    model's own logits are used instead (`own_logits_head`, checked the same way). Raises TypeError when neither
    reproduces them. Tolerance: 1e-4 (float32) or 2e-2 (bf16/fp16) of the largest |logit|."""
    ids = ids[:HEAD_PROBE]
    dev = model.get_input_embeddings().weight.device
    want = model(input_ids=ids.view(1, -1).to(dev), use_cache=False).logits[0].float().cpu()  # (t, V)
    h = final_hidden(model, ids)
    tol = (1e-4 if body_dtype(model) == torch.float32 else 2e-2) * float(want.abs().max().clamp_min(1e-6))

    def err(head: Head) -> float:
        got = head(h).float().cpu()
        return float((got - want).abs().max()) if got.shape == want.shape else float("inf")

    e = err(output_head(model))
    if e <= tol:
        return None
    e2 = err(own_logits_head(model))
    if e2 <= tol:
        return (
            f"{type(model).__name__}: the LM head as read from the config differs from the model's own logits "
            f"(max |Δlogit| {e:.3g}); measuring with the model's own logits (no reference summary)"
        )
    raise TypeError(
        f"{type(model).__name__}: neither the config's LM head (max |Δlogit| {e:.3g}) nor the model's own "
        f"forward on given hidden states ({e2:.3g}) reproduces model(ids).logits"
    )


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body (embeddings + blocks + final norm) that returns last_hidden_state."""
    get = getattr(model, "get_decoder", None)
    body = get() if callable(get) else None
    return body if body is not None else model.base_model


@torch.no_grad()
def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ids (T,) int64 → final hidden states (T, H) on CPU, in the model's dtype."""
    dev = model.get_input_embeddings().weight.device
    out = decoder_of(model)(input_ids=ids.view(1, -1).to(dev), use_cache=False)
    return out.last_hidden_state[0].to("cpu")  # (T, H)


@torch.no_grad()
def compare(
    ref_head: Head,
    cmp_head: Head,
    h_ref: torch.Tensor,
    h_cmp: torch.Tensor,
    ids: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> PositionStats:
    """Per-position KL, top-1 agreement and ΔNLL from two (T, H) hidden-state tensors of the same ids (T,).

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
    rkl = torch.empty(T, dtype=torch.float32)
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
                torch.empty(max(rows, e - s), V, dtype=torch.float32, device=z_ref.device) for _ in range(3)
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
        p_cmp = torch.exp(lp_cmp, out=bufs[2][: e - s])  # (c, V); read-only use of lp_cmp before the KL below
        # in place, the same arithmetic as (exp(lp_ref) * (lp_ref - lp_cmp)).sum(-1)
        diff = torch.sub(lp_ref, lp_cmp, out=lp_cmp)
        rkl[s:e] = p_cmp.mul_(diff).sum(dim=-1).neg_().cpu()  # Σ p_cmp·(lp_cmp − lp_ref); diff is not changed
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


@dataclass
class RefSummary:
    """The reference's next-token distributions reduced to what the measure needs, per position (T of them).

    Valid against any model whose LM head is the same linear map (`shared_linear_head`): then
    Σ_v p_ref(v)·(z_ref(v) − z_cmp(v)) = (h_ref − h_cmp)·mu, because z = scale·(W h + b) for both.
    """

    mu: torch.Tensor  # (T, H) float32: scale · Wᵀ p_ref, the expected output embedding under P_ref
    lse: torch.Tensor  # (T,) float64: log Σ_v exp z_ref(v)
    argmax: torch.Tensor  # (T,) int64: first maximal reference logit
    nll: torch.Tensor  # (T-1,) float64: −log p_ref(token t+1) at position t
    rows: int  # positions per block; compare_summary uses the same blocks, so identical models give 0

    def prefix(self, n: int) -> RefSummary:
        """The summary of the first n positions (causal: identical to a summary of an n-token pass)."""
        return RefSummary(self.mu[:n], self.lse[:n], self.argmax[:n], self.nll[: max(n - 1, 0)], self.rows)


def _plain_linear(head: nn.Module) -> bool:
    """True when `head` is an nn.Linear whose call is exactly F.linear (no subclass, replaced forward or hooks)."""
    from torch.nn.modules import module as _m

    return (
        type(head) is nn.Linear
        and "forward" not in head.__dict__
        and not (head._forward_hooks or head._forward_pre_hooks)
        and not (getattr(_m, "_global_forward_hooks", None) or getattr(_m, "_global_forward_pre_hooks", None))
    )


def linear_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float] | None:
    """(weight (V, H), bias, scale) when `output_head(model)` is exactly scale·(W h + b); None otherwise
    (a head with hooks, a replaced forward, a subclass, or logit soft-capping)."""
    head = model.get_output_embeddings()
    scale, softcap = head_transform(model)
    if head is None or not _plain_linear(head) or softcap:
        return None
    return head.weight, head.bias, scale


@torch.no_grad()
def shared_linear_head(ref_model: nn.Module, cmp_model: nn.Module) -> bool:
    """True when both models' LM heads are the same plain linear map (equal weights, bias and scale)."""
    a, b = linear_head(ref_model), linear_head(cmp_model)
    if a is None or b is None or a[2] != b[2] or a[0].shape != b[0].shape or a[0].dtype != b[0].dtype:
        return False
    if (a[1] is None) != (b[1] is None) or (a[1] is not None and not torch.equal(a[1], b[1].to(a[1].device))):
        return False
    return a[0] is b[0] or torch.equal(a[0], b[0].to(a[0].device))


def summary_rows(model: nn.Module, chunk: int) -> int:
    """Positions per block of `summarize_reference(model, …, chunk)`; 0 when the head allows no summary."""
    lin = linear_head(model)
    return 0 if lin is None else _rows(lin[0].shape[0], chunk, lin[0].device)


def _rows(vocab: int, chunk: int, device: torch.device) -> int:
    """Positions per block: `chunk`, and on CPU at most about BLOCK_BYTES of float32 logits."""
    return min(chunk, max(1, BLOCK_BYTES // (4 * vocab))) if device.type == "cpu" else chunk


def _lse_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z (c, V) float32, overwritten with exp(z − max) → (lse (c,) float64, argmax (c,), Σ exp(z − max) (c,))."""
    m, idx = z.max(dim=-1)  # first maximal logit, as argmax
    s = z.sub_(m.unsqueeze(1)).exp_().sum(dim=-1)
    return m.double() + s.double().log(), idx, s


@torch.no_grad()
def summarize_reference(
    model: nn.Module, h_ref: torch.Tensor, ids: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> RefSummary:
    """RefSummary of `model` (whose head must satisfy `linear_head`) from hidden states (T, H) of ids (T,)."""
    lin = linear_head(model)
    if lin is None:
        raise ValueError(f"{type(model).__name__}'s LM head is not a plain linear map; use compare()")
    weight, _, scale = lin
    head = output_head(model)
    w = weight if weight.dtype == torch.float32 else weight.float()  # (V, H)
    T = h_ref.shape[0]
    rows = _rows(w.shape[0], chunk, w.device)
    mu = torch.empty(T, w.shape[1], dtype=torch.float32)
    lse = torch.empty(T, dtype=torch.float64)
    argmax = torch.empty(T, dtype=torch.int64)
    nll = torch.empty(max(T - 1, 0), dtype=torch.float64)
    for s in range(0, T, rows):
        e = min(T, s + rows)
        z = head(h_ref[s:e]).float()  # (c, V), a fresh tensor: overwritten below
        te = min(e, T - 1)
        z_next = (
            z[: te - s].gather(1, ids[s + 1 : te + 1].to(z.device).view(-1, 1)).squeeze(1) if te > s else None
        )
        lse_b, idx, tot = _lse_(z)  # z now holds exp(z − max)
        mu[s:e] = (z @ w).mul_((scale / tot).unsqueeze(1)).cpu()  # (c, H): scale · Wᵀ p
        lse[s:e], argmax[s:e] = lse_b.cpu(), idx.cpu()
        if z_next is not None:
            nll[s:te] = (lse_b[: te - s] - z_next.double()).cpu()
    return RefSummary(mu, lse, argmax, nll, rows)


@torch.no_grad()
def compare_summary(
    ref: RefSummary,
    cmp_head: Head,
    h_ref: torch.Tensor,
    h_cmp: torch.Tensor,
    ids: torch.Tensor,
    cmp_linear: tuple[torch.Tensor, torch.Tensor | None, float] | None = None,
) -> PositionStats:
    """`compare` against a RefSummary: the same statistics without recomputing the reference logits.

    KL(P_ref ‖ P_cmp) = Σ p_ref·(z_ref − z_cmp) − lse_ref + lse_cmp = (h_ref − h_cmp)·mu − lse_ref + lse_cmp,
    the scalars in float64; only the compared model's logits (float32, in the summary's blocks) are
    computed. `cmp_head` must be the same linear map as the reference's (`shared_linear_head`).

    Δp of the next token is exp(−NLL_cmp) − exp(−NLL_ref) (NLL_ref is in the summary). Reverse KL needs the
    compared model's expected output embedding mu_cmp = scale·Wᵀp_cmp: KL(P_cmp ‖ P_ref) = (h_cmp − h_ref)·mu_cmp
    − lse_cmp + lse_ref; it is computed when `cmp_linear` = `linear_head(compared model)` is given (one more
    (c, V) × (V, H) product per block), else `rkl` is None. Neither touches the forward-KL arithmetic."""
    T = h_ref.shape[0]
    if h_cmp.shape[0] != T or ids.shape[0] != T or ref.lse.shape[0] != T:
        raise ValueError(
            f"shape mismatch: ref {tuple(h_ref.shape)}, cmp {tuple(h_cmp.shape)}, ids {tuple(ids.shape)}, "
            f"summary {tuple(ref.lse.shape)}"
        )
    kl = torch.empty(T, dtype=torch.float32)
    top1 = torch.empty(T, dtype=torch.bool)
    dnll = torch.empty(max(T - 1, 0), dtype=torch.float32)
    dp = torch.empty(max(T - 1, 0), dtype=torch.float32)
    rkl = torch.empty(T, dtype=torch.float32) if cmp_linear is not None else None
    w = None
    if cmp_linear is not None:
        w = cmp_linear[0] if cmp_linear[0].dtype == torch.float32 else cmp_linear[0].float()  # (V, H)
    for s in range(0, T, ref.rows):
        e = min(T, s + ref.rows)
        z = cmp_head(h_cmp[s:e]).float()  # (c, V), a fresh tensor: overwritten below
        te = min(e, T - 1)
        z_next = (
            z[: te - s].gather(1, ids[s + 1 : te + 1].to(z.device).view(-1, 1)).squeeze(1) if te > s else None
        )
        lse, idx, tot = _lse_(z)
        mu_cmp = None
        if w is not None:  # z holds exp(z − max): scale · Wᵀ p_cmp, as summarize_reference forms mu
            mu_cmp = (z @ w).mul_((cmp_linear[2] / tot).unsqueeze(1)).cpu()  # (c, H)
        del z
        lse = lse.cpu()
        dh = h_ref[s:e].double() - h_cmp[s:e].to(h_ref.device).double()  # (c, H)
        kl[s:e] = ((dh * ref.mu[s:e].double()).sum(dim=-1) - ref.lse[s:e] + lse).float()
        if mu_cmp is not None:
            rkl[s:e] = ((dh * mu_cmp.double()).sum(dim=-1).neg_() - lse + ref.lse[s:e]).float()
        top1[s:e] = idx.cpu() == ref.argmax[s:e]
        if z_next is not None:
            nll_cmp = lse[: te - s] - z_next.double().cpu()
            dnll[s:te] = (nll_cmp - ref.nll[s:te]).float()
            dp[s:te] = (torch.exp(-nll_cmp) - torch.exp(-ref.nll[s:te])).float()
    return PositionStats(kl, top1, dnll, rkl, dp)


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


def matched_ids(ids: torch.Tensor, length: int) -> torch.Tensor:
    """ids (N,) → its last `length` tokens (length,): the input of the matched-target design at context length
    `length`. Its last T positions are the sample's fixed target span (the same tokens for every length), each
    read with `length` − T + its offset tokens of context."""
    if not 0 < length <= ids.shape[0]:
        raise ValueError(f"matched input of {length} tokens from a sample of {ids.shape[0]}")
    return ids[ids.shape[0] - length :]


def passes_for(lengths: Sequence[int], one_pass: bool) -> dict[int, tuple[int, ...]]:
    """Forward-pass length → the context lengths summarized from it."""
    lengths = tuple(sorted(lengths))
    if one_pass:
        return {lengths[-1]: lengths}
    return {L: (L,) for L in lengths}


def length_dependence(model: nn.Module) -> str | None:
    """A reason why outputs at a position may depend on the total sequence length, from the config."""
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rope, dict):
        sub = [rope] + [v for v in rope.values() if isinstance(v, dict)]
        for r in sub:
            kind = r.get("rope_type") or r.get("type")
            if kind in ("dynamic", "longrope"):
                return f"rope scaling '{kind}' changes with sequence length"
    return None


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
