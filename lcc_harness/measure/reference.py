"""The reference run: final hidden states of the uncompressed model, computed once and cached on disk.

With `summary_chunk`, each pass also carries the reference's next-token distributions reduced to a
RefSummary (measure.summarize_reference): the LM-head work on the reference is then done once per
reference, not once per method, and a cache hit costs nothing but reading the file.

Cache entries are safetensors files named by a hash of everything they depend on (model fingerprint,
dtype, device type, sample provenance, pass lengths, summary blocks, library versions, cache format).
The metadata repeats the full key and a sha256 of the tensor bytes; an entry whose key or checksum does
not match is recomputed, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lcc_harness import __version__
from lcc_harness.files import atomic_write, default_cache_dir
from lcc_harness.files import entry_lock as _entry_lock
from lcc_harness.measure.design import length_dependence, matched_ids, passes_for
from lcc_harness.measure.head import (
    RefSummary,
    final_hidden,
    output_head,
    own_logits_head,
    summarize_reference,
    summary_rows,
)
from lcc_harness.measure.kl import DEFAULT_CHUNK, Head, compare
from lcc_harness.models.corpus import Sample
from lcc_harness.models.load import LoadedModel, dtype_name

log = logging.getLogger(__name__)

CACHE_FORMAT = 3
# KL between a short pass and the same positions of a long pass above this means the model's outputs
# depend on the total length. Measured on SmolLM2 (256 vs 2048 tokens, 4 samples, CPU): float32 max 0
# (bit-identical), bfloat16 max 5.7–6.9e-3 per position from rounding alone (bench/self_noise.py), so bf16
# gets 3e-2.
LENGTH_PROBE_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@dataclass
class Reference:
    """Reference hidden states per pass length: hidden[P][i] is (P, H) for sample i; summaries[P][i] its
    RefSummary when one was asked for and the LM head is a plain linear map (else summaries is empty)."""

    samples: list[Sample]
    lengths: tuple[int, ...]
    hidden: dict[int, list[torch.Tensor]]
    head: Head
    one_pass: bool
    key: str
    seconds: float = 0.0
    cache_hit: bool = False
    notes: list[str] = field(default_factory=list)
    summaries: dict[int, list[RefSummary]] = field(default_factory=dict)
    summary_seconds: float = 0.0

    def passes(self) -> dict[int, tuple[int, ...]]:
        return passes_for(self.lengths, self.one_pass)


def reference_key(
    lm: LoadedModel,
    samples: Sequence[Sample],
    lengths: Sequence[int],
    one_pass: bool,
    rows: int = 0,
    target: int | None = None,
) -> str:
    """The cache key: a hash of everything a reference depends on. `target`: the matched-target reference's T
    (its own component, absent from the window reference's key, whose value is unchanged)."""
    import transformers

    spec = {
        "format": CACHE_FORMAT,
        "harness": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": lm.name,
        "source": lm.source,
        "fingerprint": lm.fingerprint(),
        "dtype": dtype_name(lm.dtype),
        "device_type": lm.device_type,
        "samples": [s.span.to_dict() for s in samples],
        "lengths": sorted(lengths),
        "one_pass": one_pass,
        "summary_rows": rows,
    }
    if target is not None:
        spec["design"], spec["matched_target"] = "matched", target
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def build_reference(
    lm: LoadedModel,
    samples: Sequence[Sample],
    lengths: Sequence[int],
    *,
    naive: bool = False,
    cache_dir: Path | str | None = None,
    use_cache: bool = True,
    progress: bool = False,
    summary_chunk: int | None = DEFAULT_CHUNK,
    own_logits: bool = False,
) -> Reference:
    """Compute (or load from cache) the reference hidden states for `samples` at `lengths`, and with
    `summary_chunk` (positions per LM-head block) their RefSummary when the model's head allows one.

    One pass per sample at the longest length unless `naive` or the model's outputs depend on the total
    length (then one pass per length, with a warning). `own_logits`: the head is the model's own forward
    (`own_logits_head`, for families whose head `output_head` does not reproduce); no summary then.
    """
    t0 = time.perf_counter()
    lengths = tuple(sorted(lengths))
    rows = summary_rows(lm.model, summary_chunk) if summary_chunk and not own_logits else 0
    key = reference_key(lm, samples, lengths, not naive, rows)
    path = Path(cache_dir or default_cache_dir()) / f"ref-{key[:32]}.safetensors"
    head = own_logits_head(lm.model) if own_logits else output_head(lm.model)
    with _entry_lock(path) if use_cache else contextlib.nullcontext():
        return _build(
            lm, samples, lengths, naive, use_cache, progress, summary_chunk, rows, key, path, head, t0
        )


def _build(
    lm: LoadedModel,
    samples: Sequence[Sample],
    lengths: tuple[int, ...],
    naive: bool,
    use_cache: bool,
    progress: bool,
    summary_chunk: int | None,
    rows: int,
    key: str,
    path: Path,
    head: Head,
    t0: float,
) -> Reference:
    if use_cache:
        loaded = _load(path, key)
        problem = _shape_problem(loaded, samples, lengths, lm) if loaded is not None else None
        if problem:
            log.warning("reference cache %s does not match the samples (%s); recomputing", path, problem)
            warnings.warn(f"reference cache {path.name} unusable ({problem}); recomputed", stacklevel=2)
            loaded = None
        if loaded is not None:
            hidden, summaries, meta = loaded
            notes = json.loads(meta.get("notes", "[]"))
            for msg in notes:
                warnings.warn(msg, stacklevel=2)
            return Reference(
                list(samples),
                lengths,
                hidden,
                head,
                meta.get("one_pass") == "1",
                key,
                time.perf_counter() - t0,
                True,
                notes,
                summaries,
            )
    notes: list[str] = []
    one_pass = not naive
    first_long = None
    if one_pass:
        reason = length_dependence(lm.model)
        if reason is None and len(lengths) > 1:  # the probe reuses sample 0's long pass
            first_long = final_hidden(lm.model, samples[0].ids[: lengths[-1]])
            reason = probe_length_dependence(lm.model, head, samples[0].ids, lengths, first_long)
        if reason:
            one_pass = False
            msg = f"{lm.name}: {reason}; measuring one pass per length (slower)"
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)
    hidden: dict[int, list[torch.Tensor]] = {}
    from tqdm.auto import tqdm

    passes = passes_for(lengths, one_pass)
    bar = tqdm(total=len(passes) * len(samples), desc="reference", disable=not progress, leave=False)
    for P in passes:
        hidden[P] = []
        for i, s in enumerate(samples):
            reuse = first_long is not None and i == 0 and lengths[-1] == P
            hidden[P].append(first_long if reuse else final_hidden(lm.model, s.ids[:P]))
            bar.update()
    bar.close()
    t_sum = time.perf_counter()
    summaries = (
        {
            P: [
                summarize_reference(lm.model, h, s.ids[:P], summary_chunk)
                for h, s in zip(hs, samples, strict=True)
            ]
            for P, hs in hidden.items()
        }
        if rows
        else {}
    )
    t_sum = time.perf_counter() - t_sum
    if use_cache:
        _save(
            path, key, hidden, summaries, {"one_pass": "1" if one_pass else "0", "notes": json.dumps(notes)}
        )
    return Reference(
        list(samples),
        lengths,
        hidden,
        head,
        one_pass,
        key,
        time.perf_counter() - t0,
        False,
        notes,
        summaries,
        t_sum,
    )


def probe_length_dependence(
    model: torch.nn.Module,
    head: Head,
    ids: torch.Tensor,
    lengths: Sequence[int],
    h_full: torch.Tensor,
    tol: float | None = None,
) -> str | None:
    """A reason why `model`'s outputs depend on the total length, or None: a pass over the first min(shortest
    length, 256) tokens of `ids` is compared (max per-position KL) with the same positions of the longest pass
    `h_full`. Tolerance LENGTH_PROBE_TOL of the model's dtype unless `tol` is given."""
    short, long_ = min(lengths), max(lengths)
    probe = min(short, 256)
    h_short = final_hidden(model, ids[:probe])
    kl = compare(head, head, h_full[:probe], h_short, ids[:probe]).kl
    tol = LENGTH_PROBE_TOL.get(h_short.dtype, 5e-3) if tol is None else tol
    worst = float(kl.abs().max())
    if not worst <= tol:  # NaN counts as dependent
        return f"outputs at shared positions differ between a {probe}- and a {long_}-token pass (max KL {worst:.2e})"
    return None


SUMMARY_FIELDS = ("mu", "lse", "argmax", "nll")


def _shape_problem(
    loaded: tuple, samples: Sequence[Sample], lengths: Sequence[int], lm: LoadedModel
) -> str | None:
    """What makes a cache entry with the right key unusable for these samples, or None: every pass must hold one
    (P, H) tensor per sample in the model's dtype, P a pass length covering the longest length."""
    hidden, summaries, _ = loaded
    if not hidden or max(hidden) != max(lengths):
        return f"passes {sorted(hidden)} do not end at {max(lengths)}"
    return _rows_problem(hidden, summaries, len(samples), lm, "pass", lambda P: P)


def _rows_problem(
    hidden: dict[int, list[torch.Tensor]],
    summaries: dict[int, list[Any]],
    n_samples: int,
    lm: LoadedModel,
    word: str,
    rows: Callable[[int], int],
) -> str | None:
    """The first entry (`word` k: a pass or a length) whose tensors are not one (rows(k), H) tensor per sample in
    the model's dtype, or whose summaries do not have rows(k) positions; None when all fit."""
    for k, ts in hidden.items():
        n = rows(k)
        if len(ts) != n_samples:
            return f"{word} {k} holds {len(ts)} samples, not {n_samples}"
        for t in ts:
            if t.dim() != 2 or t.shape[0] != n or t.dtype != lm.dtype:
                return f"{word} {k} holds a {tuple(t.shape)} {t.dtype} tensor, not ({n}, H) {lm.dtype}"
        for sm in summaries.get(k, []):
            if sm.lse.shape[0] != n:
                return f"{word} {k} has a summary of {sm.lse.shape[0]} positions"
    return None


def _tensors(
    hidden: dict[int, list[torch.Tensor]], summaries: dict[int, list[RefSummary]]
) -> dict[str, torch.Tensor]:
    out = {f"p{P}_s{i}": t.contiguous() for P, ts in hidden.items() for i, t in enumerate(ts)}
    for P, ss in summaries.items():
        for i, sm in enumerate(ss):
            out.update({f"p{P}_s{i}_{f}": getattr(sm, f).contiguous() for f in SUMMARY_FIELDS})
    return out


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load(
    path: Path, key: str
) -> tuple[dict[int, list[torch.Tensor]], dict[int, list[RefSummary]], dict[str, str]] | None:
    if not path.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or meta.get("format") != str(CACHE_FORMAT):
                raise ValueError("key or format mismatch")
            layout: dict[str, int] = json.loads(meta["layout"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        if _checksum(tensors) != meta.get("checksum"):
            raise ValueError("checksum mismatch")
        hidden = {int(P): [tensors[f"p{P}_s{i}"] for i in range(n)] for P, n in layout.items()}
        rows = int(meta.get("summary_rows", "0"))
        summaries = (
            {
                int(P): [
                    RefSummary(*(tensors[f"p{P}_s{i}_{f}"] for f in SUMMARY_FIELDS), rows) for i in range(n)
                ]
                for P, n in layout.items()
            }
            if rows
            else {}
        )
        return hidden, summaries, meta
    except Exception as exc:  # corrupt, truncated, stale: all mean "recompute"
        log.warning("reference cache %s is unusable (%s); recomputing", path, exc)
        warnings.warn(f"reference cache {path.name} unusable ({exc}); recomputed", stacklevel=3)
        return None


def _save(
    path: Path,
    key: str,
    hidden: dict[int, list[torch.Tensor]],
    summaries: dict[int, list[RefSummary]],
    extra: dict[str, str],
) -> None:
    from safetensors.torch import save_file

    tensors = _tensors(hidden, summaries)
    rows = next((ss[0].rows for ss in summaries.values() if ss), 0)
    meta: dict[str, Any] = {
        "key": key,
        "format": str(CACHE_FORMAT),
        "checksum": _checksum(tensors),
        "layout": json.dumps({str(P): len(ts) for P, ts in hidden.items()}),
        "summary_rows": str(rows),
        **extra,
    }
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    except OSError as exc:  # a read-only cache must not stop a measurement
        log.warning("reference cache not written, the run goes on without it: %s", exc)


# ---- the matched-target reference ---------------------------------------------------------------------------


@dataclass
class MatchedReference:
    """The reference of the matched-target curves: hidden[L][i] is the reference model's final hidden states
    (T, H) on sample i's last T tokens (its target span) when it reads the last L tokens of the sample
    (`matched_ids`); summaries[L][i] their RefSummary (T positions) when the head allows one (else empty)."""

    samples: list[Sample]
    lengths: tuple[int, ...]
    target: int
    hidden: dict[int, list[torch.Tensor]]
    head: Head
    key: str
    seconds: float = 0.0
    cache_hit: bool = False
    summaries: dict[int, list[RefSummary]] = field(default_factory=dict)


def build_matched_reference(
    lm: LoadedModel,
    samples: Sequence[Sample],
    lengths: Sequence[int],
    target: int,
    *,
    cache_dir: Path | str | None = None,
    use_cache: bool = True,
    summary_chunk: int | None = DEFAULT_CHUNK,
    own_logits: bool = False,
) -> MatchedReference:
    """Compute (or load from cache) the matched-target reference: one pass per (sample, length) over the last L
    tokens of each sample, keeping the last `target` positions. Cached like `build_reference`, under a key with
    its own component (`reference_key(…, target=T)`) and the file prefix `mref-`."""
    t0 = time.perf_counter()
    lengths = tuple(sorted(lengths))
    if not 0 < target <= lengths[0]:
        raise ValueError(
            f"matched target of {target} tokens must lie in [1, {lengths[0]}] (the shortest length)"
        )
    rows = summary_rows(lm.model, summary_chunk) if summary_chunk and not own_logits else 0
    key = reference_key(lm, samples, lengths, False, rows, target)
    path = Path(cache_dir or default_cache_dir()) / f"mref-{key[:32]}.safetensors"
    head = own_logits_head(lm.model) if own_logits else output_head(lm.model)
    with _entry_lock(path) if use_cache else contextlib.nullcontext():
        if use_cache:
            loaded = _load(path, key)
            problem = _matched_problem(loaded, samples, lengths, target, lm) if loaded is not None else None
            if problem:
                warnings.warn(f"reference cache {path.name} unusable ({problem}); recomputed", stacklevel=2)
            elif loaded is not None:
                hidden, summaries, _ = loaded
                secs = time.perf_counter() - t0
                return MatchedReference(
                    list(samples), lengths, target, hidden, head, key, secs, True, summaries
                )
        hidden = {
            L: [final_hidden(lm.model, matched_ids(s.ids, L))[-target:].clone() for s in samples]
            for L in lengths
        }  # (T, H) each
        summaries = (
            {
                L: [
                    summarize_reference(lm.model, h, matched_ids(s.ids, target), summary_chunk)
                    for h, s in zip(hs, samples, strict=True)
                ]
                for L, hs in hidden.items()
            }
            if rows
            else {}
        )
        if use_cache:
            _save(path, key, hidden, summaries, {"design": "matched", "target": str(target)})
    secs = time.perf_counter() - t0
    return MatchedReference(list(samples), lengths, target, hidden, head, key, secs, False, summaries)


def _matched_problem(
    loaded: tuple, samples: Sequence[Sample], lengths: Sequence[int], target: int, lm: LoadedModel
) -> str | None:
    """What makes a matched cache entry with the right key unusable, or None: every length must hold one (T, H)
    tensor per sample in the model's dtype (and a T-position summary when summaries are stored)."""
    hidden, summaries, _ = loaded
    if sorted(hidden) != sorted(lengths):
        return f"lengths {sorted(hidden)}, not {sorted(lengths)}"
    return _rows_problem(hidden, summaries, len(samples), lm, "length", lambda L: target)
