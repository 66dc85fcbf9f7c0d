"""The curves: per-length window statistics of a model against the reference (one pass per sample), and the matched-target curves"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from lcc_harness.engines.results import (  # noqa: F401 - re-exported: callers import the run's records from here too
    MatchedCurves,
    MethodResult,
    RunConfig,
    is_oom,
    oom_message,
    validate_lengths,
)
from lcc_harness.errors import (
    MethodRunError,
    OOMError,
)
from lcc_harness.measure.design import matched_ids
from lcc_harness.measure.head import (
    compare_summary,
    final_hidden,
    linear_head,
    output_head,
    shared_linear_head,
)
from lcc_harness.measure.kl import Head, LengthStats, PositionStats, check_finite, compare, summarize
from lcc_harness.measure.reference import (
    Reference,
    probe_length_dependence,
)
from lcc_harness.models.load import dtype_name

# sample index → (its ids over the longest length (Lmax,), the last T hidden states of that pass (T, H)): the window
# measurement's longest pass handed to the matched one under design both, which scores the same targets on it
Tails = dict[int, tuple[torch.Tensor, torch.Tensor]]


class _LengthDependent(Exception):
    """Raised inside a one-pass measurement once sample 0's longest pass shows the compressed model's outputs
    depend on the total length: the remaining samples are not measured one-pass for nothing."""


def release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Curves:
    """Harness's the curves (a part of Harness; it reads the harness's state)."""

    def measure_model(self, model: torch.nn.Module, method_id: str) -> dict[int, LengthStats]:
        """Per-length statistics of `model` against the reference (one pass per sample unless naive).

        Raises OOMError when any length runs out of memory (see `measure_lengths` for partial results)."""
        stats, errors, _ = self.measure_lengths(model, method_id)
        if errors:
            raise OOMError(errors[min(errors)])
        return stats

    def measure_lengths(
        self,
        model: torch.nn.Module,
        method_id: str,
        tails: Tails | None = None,
        keep: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
    ) -> tuple[dict[int, LengthStats], dict[int, str], str | None]:
        """Per-length statistics, length → message for lengths that ran out of memory, and a note when the
        compressed model's outputs depend on the total length (it was then measured one pass per length).
        With `tails` (a dict, filled here), each sample's pass over the longest length leaves its ids and last
        T hidden states there: the matched curve's longest pass is the same forward (`measure_matched`).

        The length probe (`probe_length_dependence`) runs right after sample 0's longest pass, so a model whose
        outputs depend on the total length costs one wasted long pass, not one per sample.

        A one-pass run that runs out of memory falls back to one pass per shorter length, shortest first, so
        the lengths that fit are still measured; once a length fails, longer ones are not tried. `keep` (a dict,
        filled here): per length, each sample's per-position (KL, top-1) of the pass that covers it (the probes)."""
        from tqdm.auto import tqdm

        ref = self.reference
        head = self.head(model)
        ref_head = self._reference_head(model)
        summary = (
            bool(ref.summaries)
            and not self._own_logits
            and ref_head is ref.head
            and shared_linear_head(self.lm.model, model)
        )
        per_len: dict[int, list[PositionStats]] = {}
        errors: dict[int, str] = {}
        passes = ref.passes()
        bar = tqdm(
            total=len(passes) * len(ref.samples), desc=method_id, disable=not self.cfg.progress, leave=False
        )

        # called with sample 0's hidden states of the one pass over the longest length
        def probe(h0: torch.Tensor) -> None:
            if h0.shape[0] == max(self.lengths):
                reason = probe_length_dependence(model, head, ref.samples[0].ids, self.lengths, h0)
                if reason:  # not causal-prefix stable: each length is measured on its own
                    raise _LengthDependent(reason)

        one_pass_probe = probe if ref.one_pass and len(self.lengths) > 1 else None

        def attempt(P: int, run_len: int, lens: tuple[int, ...], on_first: Any = None) -> None:
            if errors:
                for L in lens:
                    errors[L] = (
                        f"'{method_id}' not measured at length {L}: length {min(errors)} ran out of memory"
                    )
                return
            try:
                sts = self._measure_pass(
                    model, head, ref, P, run_len, lens, method_id, summary, on_first, ref_head, tails
                )
            except Exception as exc:
                if isinstance(exc, _LengthDependent) or not is_oom(exc):
                    raise
                msg = oom_message(f"measuring '{method_id}'", run_len, exc)
            else:
                per_len.update(dict.fromkeys(lens, sts))
                return
            release_memory()  # outside the except block: the traceback no longer holds activations
            errors[run_len] = msg

        note = None
        try:
            for P, covered in passes.items():
                attempt(P, P, covered, one_pass_probe)
                # the one pass failed: measure shorter lengths one by one
                if P in errors and len(covered) > 1:
                    failed = errors.pop(P)
                    for L in covered[:-1]:
                        attempt(P, L, (L,))
                    errors.setdefault(P, failed)
                bar.update(len(ref.samples))
        except _LengthDependent as dep:
            note = (
                f"'{method_id}': {dep}; its outputs depend on the total length, so it was measured one pass "
                "per length"
            )
            warnings.warn(note, stacklevel=2)
            per_len.clear()
            errors.clear()
            P = max(passes)
            for L in self.lengths:
                attempt(P, L, (L,))
        bar.close()
        stats = {L: summarize(L, per_len[L]) for L in self.lengths if L in per_len}
        if keep is not None:
            keep.update({L: [(st.kl, st.top1) for st in per_len[L]] for L in stats})
        return stats, dict(sorted(errors.items())), note

    def _measure_pass(
        self,
        model: torch.nn.Module,
        head: Any,
        ref: Reference,
        P: int,
        run_len: int,
        lengths: Sequence[int],
        method_id: str,
        summary: bool = False,
        on_first: Any = None,
        ref_head: Any = None,
        tails: Tails | None = None,
    ) -> list[PositionStats]:
        """Each sample's first `run_len` tokens through `model`, compared with reference pass P (or its
        RefSummary when `summary`); NaN/Inf at any of `lengths` raises NonFiniteError. `on_first` (the length
        probe) is called with sample 0's hidden states once they are compared, before any other sample runs."""
        out = []
        # the compressed model's head, for reverse KL on the summary path (only on request: RunConfig.reverse_kl)
        lin = linear_head(model) if summary and self.cfg.reverse_kl else None
        for i, s in enumerate(ref.samples):
            h_ref = ref.hidden[P][i][:run_len]
            if summary:
                summ = ref.summaries[P][i].prefix(run_len)
            tally = self._tally
            if tally is not None and i < len(tally.refs) and run_len == tally.length and not tally.done(i):
                with tally.compare_to(model, i):  # the anatomy rides on this pass: no extra forward
                    h = final_hidden(model, s.ids[:run_len])  # (run_len, H)
            else:
                h = final_hidden(model, s.ids[:run_len])  # (run_len, H)
            if tails is not None and run_len == self.lengths[-1]:
                tails[i] = (s.ids[:run_len], h[-self.target :].clone())  # ids (run_len,), (T, H)
            if summary:
                st = compare_summary(summ, head, h_ref, h, s.ids[:run_len], lin)
            else:
                st = compare(
                    ref_head or ref.head,
                    head,
                    h_ref,
                    h,
                    s.ids[:run_len],
                    self.cfg.chunk_size,
                    self.cfg.reverse_kl,
                )
            for L in lengths:
                check_finite(method_id, L, i, st)
            if on_first is not None and i == 0:  # after the finiteness check: NaN output fails as non-finite
                on_first(h)
            out.append(st)
        return out

    def measure_matched(
        self, model: torch.nn.Module, method_id: str, tails: Tails | None = None
    ) -> MatchedCurves:
        """The matched-target curves of `model`: for each length L (shortest first) and sample, one pass over
        the sample's last L tokens, compared on its last T positions with the matched reference (its RefSummary
        when both heads are the same linear map, else both heads: `compare`). A length that runs out of memory
        is recorded in `errors`, and longer lengths are not tried. `tails`: what `measure_lengths` kept of the
        same model's longest pass; a sample whose kept ids equal its longest matched input reuses it."""
        from lcc_harness.measure.growth import FLOOR_MIN, GROWTH_MIN_FLOORS, matched_growth

        mref = self.matched_reference
        T = mref.target
        head = self.head(model)
        ref_head = self._reference_head(model)
        summary = (
            bool(mref.summaries)
            and not self._own_logits
            and ref_head is mref.head
            and shared_linear_head(self.lm.model, model)
        )
        # the compressed model's head, for reverse KL on the summary path (only on request: RunConfig.reverse_kl)
        lin = linear_head(model) if summary and self.cfg.reverse_kl else None
        per_len: dict[int, list[PositionStats]] = {}
        errors: dict[int, str] = {}
        tails = tails or {}
        for L in mref.lengths:
            if errors:
                errors[L] = (
                    f"'{method_id}' not measured at length {L}: length {min(errors)} ran out of memory"
                )
                continue
            try:
                sts = []
                for i, s in enumerate(mref.samples):
                    x = matched_ids(s.ids, L)  # (L,): the target is its last T tokens
                    kept = tails.get(i) if mref.lengths[-1] == L else None
                    if kept is not None and torch.equal(kept[0], x):  # the same forward: reuse it
                        h = kept[1]
                    else:
                        h = final_hidden(model, x)[-T:]  # (T, H)
                    if summary:
                        st = compare_summary(mref.summaries[L][i], head, mref.hidden[L][i], h, x[-T:], lin)
                    else:
                        st = compare(
                            ref_head,
                            head,
                            mref.hidden[L][i],
                            h,
                            x[-T:],
                            self.cfg.chunk_size,
                            self.cfg.reverse_kl,
                        )
                    check_finite(method_id, L, i, st)
                    sts.append(st)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                msg = oom_message(f"measuring '{method_id}' (matched)", L, exc)
            else:
                per_len[L] = sts
                continue
            release_memory()
            errors[L] = msg
        stats = {L: dataclasses.replace(summarize(T, sts, lo=0), length=L) for L, sts in per_len.items()}
        done = sorted(stats)
        min_kl = GROWTH_MIN_FLOORS * FLOOR_MIN.get(dtype_name(self.lm.dtype), max(FLOOR_MIN.values()))
        g = (
            matched_growth({L: stats[L].per_sample["window_kl"] for L in done}, done, min_kl).to_dict()
            if done
            else {}
        )
        return MatchedCurves(T, stats, g, errors)

    def _reference_head(self, model: torch.nn.Module) -> Head:
        """The reference's logits function; when `model` is the reference model compressed in place and the
        method changed its LM head's weights, the head rebuilt from the snapshot's host copy."""
        base = self._base_head()
        snap = self._snapshot
        if model is not self.lm.model or snap is None or not snap.head_changed():
            return base
        if self._own_logits:
            raise MethodRunError(
                "the method changed the LM head of a model measured through its own forward; run it with "
                "in_place=False (RunConfig) so that the reference keeps its own copy"
            )
        w = snap.original(snap.head.weight)
        b = snap.original(snap.head.bias) if snap.head.bias is not None else None
        dev = snap.head.weight.device
        return output_head(self.lm.model, (w.to(dev), None if b is None else b.to(dev)))

    def _measure_window(
        self, model: torch.nn.Module, method_id: str, keep: dict[int, Any] | None = None
    ) -> tuple[dict[int, LengthStats], dict[int, str], str | None, float, Tails | None]:
        """measure_lengths, its seconds, and (design both) the longest pass's tails for measure_matched;
        OOMError when not even the shortest length fits."""
        t0 = time.perf_counter()
        tails: Tails | None = {} if self.cfg.design == "both" else None
        stats, errors, length_note = self.measure_lengths(model, method_id, tails, keep)
        if not stats:  # not even the shortest length fits
            raise OOMError(errors[min(errors)])
        return stats, errors, length_note, time.perf_counter() - t0, tails

    def _measure_matched_timed(
        self, model: torch.nn.Module, method_id: str, tails: Tails | None
    ) -> tuple[MatchedCurves, float]:
        """measure_matched and its seconds; OOMError when the design is matched only and no length fits."""
        t0 = time.perf_counter()
        matched = self.measure_matched(model, method_id, tails)
        if not matched.stats and self.cfg.design == "matched":
            raise OOMError(matched.errors[min(matched.errors)])
        return matched, time.perf_counter() - t0
