"""The LM head, kept apart from the body: a model's head as a function of its final hidden states (chunked, float32
log-softmax), checked against the model's own logits; the reference's per-position summary (log-sum-exp) for a
shared linear head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lcc_harness.measure.kl import BLOCK_BYTES, Head, PositionStats
from lcc_harness.options import DEFAULT_CHUNK  # one definition, shared with the option table


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
