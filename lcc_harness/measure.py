"""THE definition of the measure: KL(P_ref ‖ P_cmp) of next-token distributions, in nats, per position.

Log-softmax and KL are computed in float32, in chunks of positions, from the final hidden states, so
no [T, V] logits tensor for a whole sequence ever exists. For a causal model the statistics at
position t do not depend on later tokens, so one pass at the longest length yields every shorter
length's curve; `passes_for` decides when that holds (see `length_dependence`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import NonFiniteError

DEFAULT_CHUNK = 256
Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PositionStats:
    """Per-position statistics of one sample over one forward pass of T tokens."""

    kl: torch.Tensor  # (T,) float32, nats
    top1: torch.Tensor  # (T,) bool, argmax of both distributions equal
    dnll: torch.Tensor  # (T-1,) float32, NLL_cmp - NLL_ref of token t+1 predicted at position t


@dataclass
class LengthStats:
    """Summary at context length L. Window = positions (L/2, L] (0-based [L//2, L)); cumulative = [0, L).

    Quantiles, top-1 and ΔNLL are over the window, pooled across samples; per_sample holds one value
    per sample for window_kl, cumulative_kl, top1 and dnll (for confidence intervals).
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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def output_head(model: nn.Module) -> Head:
    """hidden (..., H) → logits (..., V) exactly as the model's forward would produce them."""
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (LM head)")
    cfg = model.config
    scale = getattr(cfg, "logit_scale", None)
    softcap = getattr(cfg, "final_logit_softcapping", None)

    def apply(h: torch.Tensor) -> torch.Tensor:
        logits = head(h.to(head.weight.device, head.weight.dtype))
        if scale:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply


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
def compare(ref_head: Head, cmp_head: Head, h_ref: torch.Tensor, h_cmp: torch.Tensor,
            ids: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> PositionStats:
    """Per-position KL, top-1 agreement and ΔNLL from two (T, H) hidden-state tensors of the same ids (T,)."""
    T = h_ref.shape[0]
    if h_cmp.shape[0] != T or ids.shape[0] != T:
        raise ValueError(f"shape mismatch: ref {tuple(h_ref.shape)}, cmp {tuple(h_cmp.shape)}, ids {tuple(ids.shape)}")
    kl = torch.empty(T, dtype=torch.float32)
    top1 = torch.empty(T, dtype=torch.bool)
    dnll = torch.empty(max(T - 1, 0), dtype=torch.float32)
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        lp_ref = torch.log_softmax(ref_head(h_ref[s:e]).float(), dim=-1)  # (c, V)
        lp_cmp = torch.log_softmax(cmp_head(h_cmp[s:e]).float(), dim=-1)  # (c, V)
        kl[s:e] = (lp_ref.exp() * (lp_ref - lp_cmp)).sum(dim=-1).cpu()
        top1[s:e] = (lp_ref.argmax(dim=-1) == lp_cmp.argmax(dim=-1)).cpu()
        te = min(e, T - 1)  # positions with a next token inside the sequence
        if te > s:
            tgt = ids[s + 1:te + 1].to(lp_ref.device).view(-1, 1)  # (c', 1)
            nll_ref = -lp_ref[: te - s].gather(1, tgt).squeeze(1)
            nll_cmp = -lp_cmp[: te - s].gather(1, tgt).squeeze(1)
            dnll[s:te] = (nll_cmp - nll_ref).cpu()
        del lp_ref, lp_cmp
    return PositionStats(kl, top1, dnll)


def summarize(length: int, stats: Sequence[PositionStats]) -> LengthStats:
    """LengthStats at `length` from per-sample PositionStats covering at least `length` positions."""
    lo = length // 2
    win_kl = [s.kl[lo:length] for s in stats]
    cum_kl = [s.kl[:length] for s in stats]
    win_top1 = [s.top1[lo:length].float() for s in stats]
    win_dnll = [s.dnll[lo:length - 1] for s in stats]
    pooled = torch.cat(win_kl).double()
    q = torch.quantile(pooled, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    per = {
        "window_kl": [float(x.double().mean()) for x in win_kl],
        "cumulative_kl": [float(x.double().mean()) for x in cum_kl],
        "top1": [float(x.double().mean()) for x in win_top1],
        "dnll": [float(x.double().mean()) if x.numel() else 0.0 for x in win_dnll],
    }
    all_dnll = torch.cat(win_dnll).double()
    return LengthStats(
        length=length,
        window_kl=float(pooled.mean()),
        cumulative_kl=float(torch.cat(cum_kl).double().mean()),
        p50=q[0], p90=q[1], p99=q[2], max=float(pooled.max()),
        top1=float(torch.cat(win_top1).double().mean()),
        dnll=float(all_dnll.mean()) if all_dnll.numel() else 0.0,
        per_sample=per,
    )


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
