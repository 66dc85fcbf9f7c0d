"""Long-range probes beside mean window KL: does retrieval at a distance survive compression?

Mean KL over a window is dominated by tokens that any short context predicts. The probes look where long
context matters, on the same samples and the same reference, for every engine:

- **keytokens** — LongPPL's key tokens: position t (predicting token t+1) is a key token when the reference's
  log-probability of the true next token with the full context exceeds that with only the last W…W+W/2 tokens by
  more than `margin` nats, and the full-context log-probability is above `floor`. Per length: KL(P_ref ‖ P_cmp)
  over the key tokens of the window (L/2, L] and over the rest, and the key tokens' share. The short-context
  reference costs one pass of the reference over ~3 T tokens in blocks of W + W/2 (no long attention), once per
  reference; the compressed model pays nothing extra (its window pass already has the per-position KL).
- **copy** — a span S of `span` tokens of the sample is planted early in a probe sequence of filler text (another
  sample) and repeated so that the repeat ends exactly at each length L; scored on the repeat's tokens 2…m: both
  models' top-1 accuracy on the true next token and KL(ref ‖ cmp). Where the reference copies < 50 % of the tokens
  (pooled over samples) the probe reads n/a at that length, never a number.
- **passkey** — teacher-forced: for each length L and depth f ∈ DEPTHS, a 5–7 digit key is stated once at
  position ≈ f·L ("The <label> door's pass key is 58213. Remember it.") and asked for just before L ("What is the
  <label> door's pass key? The <label> door's pass key is 58213"); the key's tokens are scored: exact match under
  greedy top-1 (every key token is the argmax), summed log-probability, and KL. n/a where the reference's exact
  match rate is < 50 %.
- **where** — where the error lives at each length: the top-1 flip rate (1 − top-1 agreement), KL by reference
  confidence (its top-1 probability in bins of 0.1) and KL by position quarter of the window.

Copy and passkey share one probe sequence per sample of the longest length: every item for length L lies inside
[0, L), so one causal pass scores every length (the one-pass argument of the window curves), and the compressed
model pays one extra forward at the longest length per sample for both. Items for other lengths act as
distractors (other labels, other spans).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lcc_harness.errors import HarnessError
from lcc_harness.options import KEYTOKEN_WINDOW, PROBE_MIN_LENGTH, PROBES, feasible_probes

DEPTHS = (0.1, 0.5, 0.9)


# the passkey's statement and question (the key's tokens, " <key>", follow the question)
KEY_TEXT = " The {label} door's pass key is {key}. Remember it."


ASK_TEXT = " What is the {label} door's pass key? The {label} door's pass key is"


LABELS = (
    "amber", "blue", "copper", "green", "ivory", "jade", "lemon", "maroon", "navy", "olive", "pearl", "ruby",
    "silver", "teal", "violet", "white", "yellow", "coral", "indigo", "khaki", "lilac", "ochre", "rust", "slate",
)  # fmt: skip


@dataclass(frozen=True)
class ProbeConfig:
    """Which probes run and their settings (the defaults are stated in the module docstring)."""

    names: tuple[str, ...] = PROBES
    window: int = KEYTOKEN_WINDOW  # W: the short context of the key-token definition
    margin: float = 2.0  # nats: log p(full) − log p(short) above this marks a key token
    floor: float = -2.0  # nats: and log p(full) above this
    span: int = 64  # copy span (fewer when the shortest length is short: span_for)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["names"] = list(self.names)
        return d

    @property
    def reference_analysis(self) -> bool:
        """True when the reference's per-position log-probabilities are needed (keytokens, where)."""
        return "keytokens" in self.names or "where" in self.names

    @property
    def sequence(self) -> bool:
        """True when the probe sequence is needed (copy, passkey)."""
        return "copy" in self.names or "passkey" in self.names


def span_for(cfg: ProbeConfig, lengths: Sequence[int]) -> int:
    """Copy span length: cfg.span, at most an eighth of the shortest length (room for every length's items)."""
    return max(4, min(cfg.span, min(lengths) // 8))


@dataclass
class RefAnalysis:
    """Per sample: the reference's NLL of the next token with the full context (T − 1,), with the short context
    (T − 1,), and its top-1 probability (T,); float32."""

    nll_long: torch.Tensor
    nll_short: torch.Tensor
    pmax: torch.Tensor

    def key_mask(self, cfg: ProbeConfig) -> torch.Tensor:
        """(T − 1,) bool: key tokens (long − short log-probability > margin and long log-probability > floor)."""
        gain = self.nll_short - self.nll_long
        return (gain > cfg.margin) & (-self.nll_long > cfg.floor)


def short_blocks(T: int, W: int) -> list[tuple[int, int, int]]:
    """(start, first scored, end) of the short-context passes over T tokens: each pass reads ids[start:end] and
    scores positions [first scored, end) with between W and W + W//2 tokens of context. Positions < W are read
    with their whole context by every pass and are not listed."""
    S = max(1, W // 2)
    return [(s - W, s, min(T, s + S)) for s in range(W, T, S)]


def nll_and_pmax(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (c, V), targets (c,) → (NLL of the targets (c,), top-1 probability (c,)), float32 log-softmax."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (c, V)
    return -lp.gather(1, targets.view(-1, 1).to(lp.device)).squeeze(1).cpu(), lp.max(-1).values.exp().cpu()


Blocks = Callable[[], Any]  # () → iterator of (start, logits (c, V)) over one sequence, in order


@torch.no_grad()
def analyse_reference(
    ids: torch.Tensor,
    window: int,
    long_blocks: Blocks,
    short_logits: Callable[[torch.Tensor, int], torch.Tensor],
) -> RefAnalysis:
    """The reference's RefAnalysis of one sample ids (T,): `long_blocks` streams its logits over the whole
    sequence; `short_logits(ids_w, k)` returns the logits (k, V) of the last k positions of a pass over ids_w
    alone (the short-context passes of `short_blocks`)."""
    T = int(ids.shape[0])
    nll_long = torch.zeros(max(T - 1, 0), dtype=torch.float32)
    pmax = torch.zeros(T, dtype=torch.float32)
    for s, z in long_blocks():
        e = s + z.shape[0]
        te = min(e, T - 1)
        tgt = torch.cat([ids[s + 1 : te + 1], ids[:0] if te == e else ids[:1]])[: e - s]  # padded at the end
        nll, pm = nll_and_pmax(z, tgt)
        pmax[s:e] = pm
        nll_long[s:te] = nll[: te - s]
    nll_short = nll_long.clone()  # positions < W: the short context is the whole context
    for a, s, e in short_blocks(T, window):
        te = min(e, T - 1)
        if te <= s:
            continue
        z = short_logits(ids[a:te], te - s)  # (te − s, V)
        nll_short[s:te], _ = nll_and_pmax(z, ids[s + 1 : te + 1])
    return RefAnalysis(nll_long, nll_short, pmax)


def probe_sequences(
    samples: Sequence[Any], lengths: Sequence[int], tokenizer: Any, cfg: ProbeConfig, seed: int
) -> list[ProbeSequence]:
    """One probe sequence per sample (build_sequence): copy spans from the sample itself, filler from the next
    sample (a single sample: itself, rolled by half its length), keys drawn from `seed` + the sample's index.
    Both kinds of items are always planted, whichever of copy and passkey the run scores: the sequence — and so each
    probe's value — does not depend on the probe selection (a baseline written with all probes gates a run with
    one of them)."""
    n = len(samples)
    span = span_for(cfg, lengths)
    out = []
    for i, s in enumerate(samples):
        filler = samples[(i + 1) % n].ids if n > 1 else torch.roll(s.ids, s.ids.shape[0] // 2)
        out.append(build_sequence(s.ids, filler, lengths, tokenizer, ("copy", "passkey"), span, seed + i))
    return out


@dataclass
class Item:
    """A planted piece of the probe sequence: `tokens` at `start`; `scored` = offsets k within it whose token is
    scored (predicted at position start + k − 1)."""

    kind: str  # 'copy-source', 'copy', 'key', 'ask'
    length: int
    tokens: list[int]
    depth: float | None = None
    start: int = -1
    scored: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass
class ProbeSequence:
    """One sample's probe sequence (Lmax,) and its planted items; `rows` (n,) are the positions whose next token
    is scored (sorted), `targets` (n,) those tokens."""

    ids: torch.Tensor
    items: list[Item]
    rows: torch.Tensor
    targets: torch.Tensor
    notes: list[str] = field(default_factory=list)

    def rows_of(self, item: Item) -> torch.Tensor:
        """Indices into `rows` of the item's scored tokens."""
        pos = torch.tensor([item.start + k - 1 for k in item.scored], dtype=torch.int64)
        return torch.searchsorted(self.rows, pos)


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def _fit(taken: list[tuple[int, int]], want: int, size: int, lo: int, hi: int) -> int | None:
    """The start closest to `want` of a free stretch of `size` tokens inside [lo, hi), or None."""
    best = None
    free = []
    cur = lo
    for a, b in sorted(taken):
        if a > cur:
            free.append((cur, min(a, hi)))
        cur = max(cur, b)
    if cur < hi:
        free.append((cur, hi))
    for a, b in free:
        if b - a < size:
            continue
        s = min(max(want, a), b - size)
        if best is None or abs(s - want) < abs(best - want):
            best = s
    return best


def build_sequence(
    sample_ids: torch.Tensor,
    filler_ids: torch.Tensor,
    lengths: Sequence[int],
    tokenizer: Any,
    names: Sequence[str],
    span: int,
    seed: int,
) -> ProbeSequence:
    """The probe sequence of one sample: filler (Lmax,) with copy and passkey items planted for every length.

    Layout, per length L (ascending): the end block [L − B, L) holds the passkey questions (one per depth) and then
    the copy repeat, which ends exactly at L; then copy sources go to the free stretch closest to the previous
    length (the start, for the shortest: the copy distance is about L/2, L − B − span at the shortest), and key
    statements to the free stretch closest to f·L before the end block (at short
    lengths the actual depth can differ from f: the report's depth is the actual one). An item that finds no room is left out with a
    note (its cells read n/a). `seed` draws the keys (an explicit generator)."""
    lengths = sorted(lengths)
    Lmax = lengths[-1]
    if filler_ids.shape[0] < Lmax:
        reps = -(-Lmax // max(1, filler_ids.shape[0]))
        filler_ids = filler_ids.repeat(reps)
    ids = filler_ids[:Lmax].clone()
    g = torch.Generator().manual_seed(seed)
    items: list[Item] = []
    notes: list[str] = []
    taken: list[tuple[int, int]] = []
    label_k = 0
    plan: list[tuple[Item, int, int, int]] = []  # (item, wanted start, lo, hi) placed after the end blocks
    for j, L in enumerate(lengths):
        block: list[Item] = []
        if "passkey" in names:
            for f in DEPTHS:
                label = LABELS[label_k % len(LABELS)] + ("" if label_k < len(LABELS) else f" {label_k}")
                label_k += 1
                digits = int(torch.randint(5, 8, (1,), generator=g))
                key = "".join(str(int(d)) for d in torch.randint(0, 10, (digits,), generator=g))
                key = str(int(torch.randint(1, 10, (1,), generator=g))) + key[1:]  # no leading zero
                stmt = _encode(tokenizer, KEY_TEXT.format(label=label, key=key))
                ask = _encode(tokenizer, ASK_TEXT.format(label=label))
                ans = _encode(tokenizer, f" {key}")
                q = Item("ask", L, ask + ans, f, scored=tuple(range(len(ask), len(ask) + len(ans))))
                block.append(q)
                plan.append((Item("key", L, stmt, f), int(f * L), 0, L))
        if "copy" in names:
            off = (j * span) % max(1, sample_ids.shape[0] - span)
            s_tokens = sample_ids[off : off + span].tolist()
            block.append(Item("copy", L, s_tokens, scored=tuple(range(1, span))))
            plan.append((Item("copy-source", L, s_tokens), lengths[j - 1] if j else 0, 0, L))
        B = sum(len(it.tokens) for it in block)
        start = L - B
        if start < 0 or any(a < L and start < b for a, b in taken):
            notes.append(
                f"length {L}: no room for the probes' end block of {B} tokens after the shorter lengths'"
            )
            plan = [p for p in plan if p[0].length != L]
            continue
        for it in block:
            it.start = start
            start = it.end
            items.append(it)
        taken.append((L - B, L))
    ends = {it.length: min(x.start for x in items if x.length == it.length) for it in items}
    for it, want, lo, _ in sorted(plan, key=lambda p: (p[0].kind != "copy-source", p[0].length)):
        if it.length not in ends:
            continue
        hi = ends[it.length]  # before the end block of its length
        s = _fit(taken, want, len(it.tokens), lo, hi)
        if s is None:
            notes.append(f"length {it.length}: no room for a {it.kind} item of {len(it.tokens)} tokens")
            continue
        it.start = s
        taken.append((s, it.end))
        items.append(it)
    # questions whose statement found no room, and repeats whose source found none, are dropped
    placed = {(it.kind, it.length, it.depth) for it in items}
    items = [
        it
        for it in items
        if not (it.kind == "ask" and ("key", it.length, it.depth) not in placed)
        and not (it.kind == "copy" and ("copy-source", it.length, None) not in placed)
    ]
    for it in items:
        ids[it.start : it.end] = torch.tensor(it.tokens, dtype=torch.int64)
    rows = sorted({it.start + k - 1 for it in items for k in it.scored})
    rows_t = torch.tensor(rows, dtype=torch.int64)
    return ProbeSequence(ids, sorted(items, key=lambda it: it.start), rows_t, ids[rows_t + 1].clone(), notes)


@dataclass
class ProbeReference:
    """The reference's side of the probes, computed once per harness: analyses per sample (keytokens, where; None
    when neither runs), probe sequences and what the engine keeps of the reference at their scored rows (torch:
    hidden states (n, H); None when copy and passkey do not run), seconds, and a note when they were skipped."""

    analyses: list[RefAnalysis] | None
    sequences: list[ProbeSequence] | None
    rows_hidden: list[torch.Tensor] | None
    seconds: float = 0.0
    note: str | None = None


def check_probe_lengths(cfg: ProbeConfig, lengths: Sequence[int]) -> None:
    """HarnessError when the probes cannot run at these lengths (the key-token window must be shorter than the
    longest length, and the probe sequence needs room: options.feasible_probes, the rule profiles use too)."""
    ok = feasible_probes(cfg.names, lengths)
    if "keytokens" in cfg.names and "keytokens" not in ok:
        raise HarnessError(
            f"the key-token probe reads a short context of {cfg.window} tokens, not shorter than the longest length "
            f"{max(lengths)}; measure longer lengths or leave keytokens out of --probes"
        )
    if cfg.sequence and not ({"copy", "passkey"} & set(ok)):
        raise HarnessError(
            f"the copy and passkey probes need lengths of at least {PROBE_MIN_LENGTH} tokens (shortest: {min(lengths)}); drop the "
            "shorter lengths or leave copy,passkey out of --probes"
        )


def cache_key(reference_key: str, cfg: ProbeConfig, seqs: Sequence[ProbeSequence] | None) -> str:
    """A hash of what the reference's probe side depends on: the reference (its cache key), the probe settings and
    the probe sequences' tokens."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps({"ref": reference_key, "cfg": cfg.to_dict(), "format": 1}).encode())
    for q in seqs or ():
        h.update(q.ids.numpy().tobytes())
        h.update(q.rows.numpy().tobytes())
    return h.hexdigest()


def save_reference(path: Any, key: str, pr: ProbeReference) -> None:
    """Write the tensors of `pr` (analyses, rows_hidden) to a safetensors file with `key` in its metadata; a folder
    that cannot be written is skipped (the next run recomputes)."""
    from safetensors.torch import save_file

    from lcc_harness.files import atomic_write

    t: dict[str, torch.Tensor] = {}
    for i, a in enumerate(pr.analyses or ()):
        t |= {f"a{i}_long": a.nll_long, f"a{i}_short": a.nll_short, f"a{i}_pmax": a.pmax}
    for i, h in enumerate(pr.rows_hidden or ()):
        t[f"h{i}"] = h.contiguous()
    meta = {"key": key, "analyses": str(len(pr.analyses or ())), "hidden": str(len(pr.rows_hidden or ()))}
    with contextlib.suppress(OSError):
        atomic_write(
            path, lambda tmp: save_file({k: v.contiguous() for k, v in t.items()}, tmp, metadata=meta)
        )


def load_reference(
    path: Any, key: str, seqs: list[ProbeSequence] | None, note: str | None
) -> ProbeReference | None:
    """The ProbeReference stored at `path` under `key` (None when absent, of another key, or unreadable)."""
    from pathlib import Path

    from safetensors import safe_open

    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            na, nh = int(meta["analyses"]), int(meta["hidden"])
            analyses = [
                RefAnalysis(
                    f.get_tensor(f"a{i}_long"), f.get_tensor(f"a{i}_short"), f.get_tensor(f"a{i}_pmax")
                )
                for i in range(na)
            ]
            hidden = [f.get_tensor(f"h{i}") for i in range(nh)]
    except Exception:  # truncated, foreign, stale: recompute
        return None
    return ProbeReference(analyses or None, seqs, hidden or None, 0.0, note)
