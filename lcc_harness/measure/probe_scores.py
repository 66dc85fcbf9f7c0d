"""The probes' scores: per-row KL, top-1 and NLL of the compressed model against the reference on a probe
sequence, and each probe's statistics per length (key tokens, where, copy, passkey) with intervals over samples."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lcc_harness.measure.probes import DEPTHS, ProbeConfig, ProbeSequence, RefAnalysis

NA_ACCURACY = 0.5  # the reference's own accuracy below which a copy / passkey cell is n/a


CONF_BINS = 10  # reference top-1 probability bins [0, 0.1), …, [0.9, 1]


POSITION_BUCKETS = 4  # quarters of the window (L/2, L]


@dataclass
class RowScores:
    """Per scored row (n,): KL(P_ref ‖ P_cmp) in nats, whether each model's argmax is the true next token, and
    each model's log-probability of it."""

    kl: torch.Tensor
    ref_ok: torch.Tensor
    cmp_ok: torch.Tensor
    ref_lp: torch.Tensor
    cmp_lp: torch.Tensor

    def take(self, idx: torch.Tensor) -> RowScores:
        return RowScores(*(getattr(self, f)[idx] for f in ("kl", "ref_ok", "cmp_ok", "ref_lp", "cmp_lp")))


@torch.no_grad()
def score_rows(z_ref: torch.Tensor, z_cmp: torch.Tensor, targets: torch.Tensor) -> RowScores:
    """z_ref, z_cmp (n, V) logits at the scored rows, targets (n,) → RowScores (float32 log-softmax, the KL of
    measure.compare)."""
    lp_ref = torch.log_softmax(z_ref.float(), dim=-1)  # (n, V)
    lp_cmp = torch.log_softmax(z_cmp.float(), dim=-1)  # (n, V)
    kl = (lp_ref.exp() * (lp_ref - lp_cmp)).sum(-1)
    t = targets.view(-1, 1).to(lp_ref.device)
    return RowScores(
        kl.cpu(),
        (lp_ref.argmax(-1) == t.squeeze(1)).cpu(),
        (lp_cmp.argmax(-1) == t.squeeze(1)).cpu(),
        lp_ref.gather(1, t).squeeze(1).cpu(),
        lp_cmp.gather(1, t).squeeze(1).cpu(),
    )


def rows_in_blocks(blocks: Callable[[], Any], rows: torch.Tensor) -> torch.Tensor:
    """Gather the logits at `rows` (n,) from an engine's stream of (start, logits (c, V)) blocks → (n, V)."""
    out = []
    for s, z in blocks():
        sel = rows[(rows >= s) & (rows < s + z.shape[0])] - s
        if sel.numel():
            out.append(z[sel].clone())
    return torch.cat(out) if out else torch.empty(0)


def _mean(xs: Sequence[float]) -> float | None:
    return math.fsum(xs) / len(xs) if xs else None


def _interval(xs: Sequence[float]) -> list[float | None]:
    """The 90 % Student-t interval of the mean over the values (samples); [None, None] with fewer than two."""
    from lcc_harness.measure.stats import t_interval

    if len(xs) < 2:
        return [None, None]
    _, lo, hi = t_interval(list(xs), 0.90)
    return [lo, hi]


def keytoken_stats(L: int, kls: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Key-token KL at length L over the window positions [L//2, L − 1) (those whose next token lies inside L):
    pooled over samples ('kl', gated), per sample (None for a sample with no key token in the window), the
    rest's KL and the key tokens' share."""
    lo = L // 2
    key_vals, rest_vals, per = [], [], []
    for kl, m in zip(kls, masks, strict=True):
        w = m[lo : L - 1]
        k = kl[lo : L - 1]
        key_vals.append(k[w])
        rest_vals.append(k[~w])
        per.append(float(k[w].double().mean()) if bool(w.any()) else None)
    keys, rest = torch.cat(key_vals).double(), torch.cat(rest_vals).double()
    n = keys.numel() + rest.numel()
    defined = [x for x in per if x is not None]
    return {
        "kl": float(keys.mean()) if keys.numel() else None,
        "rest_kl": float(rest.mean()) if rest.numel() else None,
        "fraction": keys.numel() / n if n else 0.0,
        "n_key": int(keys.numel()),
        "per_sample": per,
        "ci": _interval(defined),
        **({} if keys.numel() else {"na": "no key token in the window"}),
    }


def where_stats(
    L: int, kls: Sequence[torch.Tensor], top1s: Sequence[torch.Tensor], pmaxs: Sequence[torch.Tensor]
) -> dict[str, Any]:
    """Where the error lives at length L (window [L//2, L), pooled): flip rate, KL by reference-confidence bin
    (CONF_BINS, None for an empty bin) with counts, KL by position quarter."""
    lo = L // 2
    kl = torch.cat([k[lo:L] for k in kls]).double()
    flip = 1.0 - float(torch.cat([t[lo:L] for t in top1s]).double().mean())
    pm = torch.cat([p[lo:L] for p in pmaxs]).double()
    b = (pm * CONF_BINS).long().clamp(0, CONF_BINS - 1)
    conf, counts = [], []
    for k in range(CONF_BINS):
        sel = b == k
        counts.append(int(sel.sum()))
        conf.append(float(kl[sel].mean()) if bool(sel.any()) else None)
    width = L - lo
    edges = [lo + (width * q) // POSITION_BUCKETS for q in range(POSITION_BUCKETS + 1)]
    pos = [
        float(torch.cat([k[edges[q] : edges[q + 1]] for k in kls]).double().mean())
        for q in range(POSITION_BUCKETS)
    ]
    return {"flip": flip, "by_confidence": conf, "confidence_counts": counts, "by_position": pos}


def copy_stats(L: int, seqs: Sequence[ProbeSequence], scores: Sequence[RowScores]) -> dict[str, Any] | None:
    """The copy cell at length L, or None when no sample has a copy item for L."""
    per_kl, ref_ok, cmp_ok, dist = [], [], [], []
    for seq, sc in zip(seqs, scores, strict=True):
        it = next((x for x in seq.items if x.kind == "copy" and x.length == L), None)
        src = next((x for x in seq.items if x.kind == "copy-source" and x.length == L), None)
        if it is None or src is None:
            continue
        r = sc.take(seq.rows_of(it))
        per_kl.append(float(r.kl.double().mean()))
        ref_ok.append(r.ref_ok.float())
        cmp_ok.append(r.cmp_ok.float())
        dist.append(it.start - src.end)
    if not per_kl:
        return None
    ref_acc = float(torch.cat(ref_ok).mean())
    out: dict[str, Any] = {"distance": round(sum(dist) / len(dist)), "ref_acc": ref_acc, "n": len(per_kl)}
    if ref_acc < NA_ACCURACY:
        return out | {
            "na": f"reference copies {ref_acc:.0%} < {NA_ACCURACY:.0%}",
            "kl": None,
            "cmp_acc": None,
        }
    return out | {
        "kl": _mean(per_kl),
        "per_sample": per_kl,
        "ci": _interval(per_kl),
        "cmp_acc": float(torch.cat(cmp_ok).mean()),
    }


def passkey_stats(L: int, seqs: Sequence[ProbeSequence], scores: Sequence[RowScores]) -> dict[str, Any]:
    """The passkey cells at length L, one per depth ('10', '50', '90'): exact match rate and mean summed
    log-probability of the key's tokens for both models, KL over them; n/a where the reference's exact match
    rate is below NA_ACCURACY."""
    out: dict[str, Any] = {}
    for f in DEPTHS:
        em_r, em_c, lp_r, lp_c, kls, depth = [], [], [], [], [], []
        for seq, sc in zip(seqs, scores, strict=True):
            ask = next((x for x in seq.items if x.kind == "ask" and x.length == L and x.depth == f), None)
            key = next((x for x in seq.items if x.kind == "key" and x.length == L and x.depth == f), None)
            if ask is None or key is None:
                continue
            r = sc.take(seq.rows_of(ask))
            em_r.append(float(bool(r.ref_ok.all())))
            em_c.append(float(bool(r.cmp_ok.all())))
            lp_r.append(float(r.ref_lp.double().sum()))
            lp_c.append(float(r.cmp_lp.double().sum()))
            kls.append(float(r.kl.double().mean()))
            depth.append(key.start / L)
        if not kls:
            continue
        cell: dict[str, Any] = {"depth": sum(depth) / len(depth), "n": len(kls), "ref_em": _mean(em_r)}
        cell["ref_lp"] = _mean(lp_r)
        if cell["ref_em"] < NA_ACCURACY:
            cell |= {"na": f"reference recalls {cell['ref_em']:.0%} < {NA_ACCURACY:.0%}", "cmp_em": None}
            cell |= {"cmp_lp": None, "kl": None}
        else:
            cell |= {"cmp_em": _mean(em_c), "cmp_lp": _mean(lp_c), "kl": _mean(kls), "per_sample": kls}
        out[str(round(100 * f))] = cell
    return out


def summarize_probes(
    cfg: ProbeConfig,
    lengths: Sequence[int],
    window: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
    analyses: Sequence[RefAnalysis] | None,
    seqs: Sequence[ProbeSequence] | None,
    scores: Sequence[RowScores] | None,
) -> dict[str, Any]:
    """The run record's `probes` entry: config, per-length cells, notes. window[L] = per sample (KL (T,), top-1
    (T,)) of the window measurement that covers L."""
    curves: dict[str, Any] = {}
    for L in sorted(lengths):
        if L not in window:
            continue
        kls = [k for k, _ in window[L]]
        cell: dict[str, Any] = {}
        if "keytokens" in cfg.names and analyses is not None:
            cell["keytokens"] = keytoken_stats(L, kls, [a.key_mask(cfg) for a in analyses])
        if "where" in cfg.names and analyses is not None:
            cell["where"] = where_stats(L, kls, [t for _, t in window[L]], [a.pmax for a in analyses])
        if "copy" in cfg.names and seqs is not None:
            c = copy_stats(L, seqs, scores)
            if c is not None:
                cell["copy"] = c
        if "passkey" in cfg.names and seqs is not None:
            cell["passkey"] = passkey_stats(L, seqs, scores)
        curves[str(L)] = cell
    notes = sorted({n for s in seqs or () for n in s.notes})
    return {"config": cfg.to_dict(), "curves": curves, **({"notes": notes} if notes else {})}
