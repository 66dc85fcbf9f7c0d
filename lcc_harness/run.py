"""Orchestration shared by the CLI and the pytest plugin.

model + corpus → samples → reference (cached) → copy + method → measure → MethodResult.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .anatomy import Anatomy, Captured, ErrorTally, capture
from .baselines import write_json_atomic  # noqa: F401 - re-exported: the CLI writes --json with it
from .corpus import Sample, TokenizedCorpus, load_corpus
from .errors import (
    HarnessError,
    LengthError,
    MethodError,
    MethodRunError,
    NonFiniteError,
    OOMError,
    first_line,
)
from .files import entry_lock
from .measure import (
    Head,
    LengthStats,
    PositionStats,
    check_finite,
    check_head,
    compare,
    compare_summary,
    final_hidden,
    linear_head,
    matched_ids,
    output_head,
    own_logits_head,
    shared_linear_head,
    summarize,
)
from .methods.registry import CompressContext, Method, parse_method
from .models import LoadedModel, dtype_name, load_model, plain_values
from .options import DESIGNS, parse_lengths  # parse_lengths re-exported: the CLI and tests use it here
from .probes import (
    ProbeConfig,
    ProbeReference,
    analyse_reference,
    check_probe_lengths,
    probe_sequences,
    score_rows,
    summarize_probes,
)
from .probes import (
    cache_key as probe_cache_key,
)
from .probes import (
    load_reference as load_probe_reference,
)
from .probes import (
    save_reference as save_probe_reference,
)
from .reference import (
    LENGTH_PROBE_TOL,
    MatchedReference,
    Reference,
    build_matched_reference,
    build_reference,
    default_cache_dir,
    probe_length_dependence,
)
from .results import (  # noqa: F401 - re-exported: callers import the run's records from here too
    MatchedCurves,
    MethodResult,
    RunConfig,
    is_oom,
    oom_message,
    validate_lengths,
)
from .snapshot import Snapshot
from .targets import linearize_conv1d

# sample index → (its ids over the longest length (Lmax,), the last T hidden states of that pass (T, H)): the window
# measurement's longest pass handed to the matched one under design both, which scores the same targets on it
Tails = dict[int, tuple[torch.Tensor, torch.Tensor]]
SENTINEL_TOKENS = 64  # tokens of the probe that re-checks the reference model after each method


def _check_head(model: torch.nn.Module, ids: torch.Tensor) -> str | None:
    """measure.check_head, its TypeError as a HarnessError (the model's logits cannot be reproduced)."""
    try:
        return check_head(model, ids)
    except TypeError as exc:
        raise HarnessError(f"{exc}; this model family is not supported") from None


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Harness:
    """Loads the model and corpus once, builds the reference once, and measures methods against it."""

    engine = "torch"

    def __init__(self, cfg: RunConfig, lm: LoadedModel | None = None) -> None:
        self.cfg = cfg
        given = [
            k
            for k, v in (("threads", cfg.threads), ("gpu-layers", cfg.gpu_layers), ("imatrix", cfg.imatrix))
            if v
        ]
        if given:
            raise HarnessError(
                f"--{given[0]} sets the llama.cpp engine; this run uses the torch engine — pass --engine llama.cpp "
                f"or drop --{given[0]}"
            )
        self.lm = lm or load_model(cfg.model, cfg.device, cfg.dtype)
        linearize_conv1d(self.lm.model)  # GPT-2 family: Conv1D → nn.Linear, so every method finds its targets
        self.lengths = parse_lengths(cfg.lengths)
        validate_lengths(self.lengths, self.lm.max_positions, cfg.model, cfg.allow_extrapolation)
        if cfg.design not in DESIGNS:
            raise HarnessError(
                f"design '{cfg.design}' is not one of {', '.join(DESIGNS)}; pass --design both"
            )
        self.target = cfg.target_tokens if cfg.target_tokens is not None else max(1, self.lengths[0] // 2)
        if not 0 < self.target <= self.lengths[0]:
            raise LengthError(
                f"--target-tokens {self.target} must lie in [1, {self.lengths[0]}] (the shortest length: every "
                "length scores the same target tokens); lower it or drop the shorter lengths"
            )
        if not 0 <= cfg.anatomy <= cfg.samples:
            raise HarnessError(
                f"--anatomy {cfg.anatomy} must lie in [0, {cfg.samples}] (the samples measured); lower it or "
                "raise --samples"
            )
        self.corpus = load_corpus(cfg.corpus, cfg.text_field)
        self.tokens = TokenizedCorpus(self.corpus, self.lm.tokenizer)
        self.samples = self.tokens.draw(cfg.samples, self.lengths[-1], cfg.seed)
        self._calibration: list[Sample] | None = None
        self._reference: Reference | None = None
        self._matched_ref: MatchedReference | None = None
        self._head_checked = False
        self._short_ref: list[torch.Tensor] | None = None
        self._sentinel: torch.Tensor | None = None
        self._snapshot: Snapshot | None = None  # host copy of the model, for compressing in place
        self.head_note: str | None = None  # set when the model's own logits replace output_head
        self._own_logits = False
        self._anatomy_refs: list[Captured] | None = None  # the reference's activations, per anatomy sample
        self._anatomy_ref_s = 0.0
        self._tally: ErrorTally | None = None  # set while a method is measured with the anatomy on
        self.anatomy_note: str | None = None  # set when the model has no decoder layers the anatomy can hook
        self.probe_cfg = ProbeConfig(tuple(cfg.probes)) if cfg.probes else None
        if self.probe_cfg is not None:
            if cfg.design == "matched":
                raise HarnessError(
                    "--probes read the window measurement; pass --design window or both, or drop --probes"
                )
            check_probe_lengths(self.probe_cfg, self.lengths)
        self._probe_ref: ProbeReference | None = None

    @property
    def calibration(self) -> list[Sample]:
        """Calibration spans, drawn lazily from what the evaluation spans leave."""
        if self._calibration is None:
            self._calibration = self.tokens.draw(
                self.cfg.calib_samples,
                self.cfg.calib_length,
                self.cfg.seed + 1,
                exclude=[s.span for s in self.samples],
                purpose="calibration",
            )
        return self._calibration

    @property
    def reference_built(self) -> Reference | None:
        """The reference if it was computed or loaded already (None: building it would cost a pass)."""
        return self._reference

    def use_reference(self, reference: Reference) -> None:
        """Measure against `reference` (e.g. another harness's, on the same model and samples) from now on."""
        if [s.span for s in reference.samples] != [s.span for s in self.samples]:
            raise HarnessError(
                "use_reference: the reference was computed on other samples than this harness's"
            )
        self._reference = reference

    def head(self, model: torch.nn.Module) -> Head:
        """The logits function used for `model` (the reference or a compressed copy): float32 `output_head`, or
        the model's own forward when the start-up check found the config's head does not reproduce it."""
        return own_logits_head(model) if self._own_logits else output_head(model)

    @property
    def reference(self) -> Reference:
        if self._reference is None:
            self._check_head_once()
            self._reference = self._or_oom(
                "computing the reference",
                lambda: build_reference(
                    self.lm,
                    self.samples,
                    self.lengths,
                    naive=self.cfg.naive,
                    cache_dir=self.cfg.cache_dir,
                    use_cache=self.cfg.use_cache,
                    progress=self.cfg.progress,
                    summary_chunk=self.cfg.chunk_size if self.cfg.reference_summary else None,
                    own_logits=self._own_logits,
                ),
            )
        return self._reference

    def _or_oom(self, what: str, build: Callable[[], Any]) -> Any:
        """build(), with an out-of-memory error turned into OOMError naming `what` and the longest length (memory
        released outside the except block, where the traceback no longer holds the activations)."""
        try:
            return build()
        except Exception as exc:
            if not is_oom(exc):
                raise
            msg = oom_message(what, self.lengths[-1], exc)
        _release_memory()
        raise OOMError(msg)

    def _check_head_once(self) -> None:
        """Check the model's head against its own logits (check_head) once per harness; sets head_note and
        whether the model's own forward replaces output_head."""
        if self._head_checked:
            return
        self.head_note = _check_head(self.lm.model, self.samples[0].ids)
        self._own_logits = self.head_note is not None
        if self.head_note:
            warnings.warn(self.head_note, stacklevel=3)
        self._head_checked = True

    @property
    def matched_reference(self) -> MatchedReference:
        """The matched-target reference (reference.build_matched_reference), computed or loaded once."""
        if self._matched_ref is None:
            self._check_head_once()
            self._matched_ref = self._or_oom(
                "computing the matched reference",
                lambda: build_matched_reference(
                    self.lm,
                    self.samples,
                    self.lengths,
                    self.target,
                    cache_dir=self.cfg.cache_dir,
                    use_cache=self.cfg.use_cache,
                    summary_chunk=self.cfg.chunk_size if self.cfg.reference_summary else None,
                    own_logits=self._own_logits,
                ),
            )
        return self._matched_ref

    def _base_head(self) -> Head:
        """The reference model's logits function: the window reference's, else the matched reference's."""
        if self._reference is not None or self.cfg.design != "matched":
            return self.reference.head
        return self.matched_reference.head

    def compress(self, method: Method | str) -> tuple[torch.nn.Module, CompressContext, float]:
        """A compressed copy of the reference model, its context (with method info) and the seconds taken
        (a deep copy: two models in memory; `run` uses `compressed`, which compresses in place)."""
        return self._compress(method, in_place=False)

    @contextlib.contextmanager
    def compressed(self, method: Method | str) -> Iterator[tuple[torch.nn.Module, CompressContext, float]]:
        """The reference model compressed by `method` in place, its context and the seconds taken; on exit,
        also when anything raised, the model is restored from the host copy (snapshot.Snapshot). With
        `RunConfig.in_place=False`, a deep copy instead (the former strategy; two models on the device)."""
        if not self.cfg.in_place:
            model, ctx, seconds = self.compress(method)
            yield model, ctx, seconds
            return
        # everything computed from the reference model happens before the method changes it
        _ = self.reference if self.cfg.design != "matched" else self.matched_reference
        if self.cfg.anatomy:
            self.anatomy_reference()
        if self._snapshot is None:
            self.sentinel()
            self._snapshot = Snapshot(self.lm.model)
        try:
            yield self._compress(method, in_place=True)
        finally:
            self._snapshot.restore()

    def _compress(
        self, method: Method | str, in_place: bool
    ) -> tuple[torch.nn.Module, CompressContext, float]:
        m = parse_method(method) if isinstance(method, str) else method
        t0 = time.perf_counter()
        calib = tuple(s.ids for s in self.calibration) if m.needs_calibration else ()
        ctx = CompressContext(
            calibration=calib, include=self.cfg.include, exclude=self.cfg.exclude, seed=self.cfg.seed
        )
        self.sentinel()  # the reference model's output before the method touches anything
        model = self.lm.model if in_place else copy.deepcopy(self.lm.model)
        try:
            model = m.apply(model, ctx) or model
        except HarnessError:
            raise
        except Exception as exc:  # a method's own bug or limit: one line naming the method
            if not is_oom(exc):
                raise MethodRunError(
                    f"method '{m.id}' raised {first_line(exc)} while compressing; fix the "
                    "method or leave it out (set LCC_DEBUG=1 or pass --debug for the "
                    "traceback)"
                ) from exc
            msg = oom_message(f"compressing with '{m.id}'", None, exc)
        else:
            msg = None
        if msg is not None:
            del model
            if in_place:
                self._snapshot.restore()  # before freeing memory: the method's tensors go with it
            _release_memory()
            raise OOMError(msg)
        with torch.no_grad():
            for name, param in model.named_parameters():
                p = plain_values(param)  # an adapter's -kernel mode leaves a library's tensor subclass
                if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                    raise NonFiniteError(
                        f"method '{m.id}' wrote non-finite values (NaN/Inf) into {name}; "
                        "the compressed weights must be finite"
                    )
        model.eval()
        return model, ctx, time.perf_counter() - t0

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

        first: list[torch.Tensor] = []  # sample 0's hidden states of the first pass, for the length probe

        def attempt(P: int, run_len: int, lens: tuple[int, ...]) -> None:
            if errors:
                for L in lens:
                    errors[L] = (
                        f"'{method_id}' not measured at length {L}: length {min(errors)} ran out of memory"
                    )
                return
            try:
                sts = self._measure_pass(
                    model, head, ref, P, run_len, lens, method_id, summary, first, ref_head, tails
                )
            except Exception as exc:
                if not is_oom(exc):
                    raise
                msg = oom_message(f"measuring '{method_id}'", run_len, exc)
            else:
                per_len.update(dict.fromkeys(lens, sts))
                return
            _release_memory()  # outside the except block: the traceback no longer holds activations
            errors[run_len] = msg

        for P, covered in passes.items():
            attempt(P, P, covered)
            if P in errors and len(covered) > 1:  # the one pass failed: measure shorter lengths one by one
                failed = errors.pop(P)
                for L in covered[:-1]:
                    attempt(P, L, (L,))
                errors.setdefault(P, failed)
            bar.update(len(ref.samples))
        bar.close()
        note = None
        if ref.one_pass and len(self.lengths) > 1 and first and first[0].shape[0] == max(self.lengths):
            reason = probe_length_dependence(model, head, ref.samples[0].ids, self.lengths, first[0])
            if reason:  # this compressed model is not causal-prefix stable: measure each length on its own
                note = (
                    f"'{method_id}': {reason}; its outputs depend on the total length, so it was measured "
                    "one pass per length"
                )
                warnings.warn(note, stacklevel=2)
                per_len.clear()
                errors.clear()
                P = max(passes)
                for L in self.lengths:
                    attempt(P, L, (L,))
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
        keep_first: list[torch.Tensor] | None = None,
        ref_head: Any = None,
        tails: Tails | None = None,
    ) -> list[PositionStats]:
        """Each sample's first `run_len` tokens through `model`, compared with reference pass P (or its
        RefSummary when `summary`); NaN/Inf at any of `lengths` raises NonFiniteError. The first call's
        sample-0 hidden states are appended to `keep_first` (the length probe reuses them)."""
        out = []
        lin = linear_head(model) if summary else None  # for reverse KL on the summary path
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
            if keep_first is not None and not keep_first and i == 0:
                keep_first.append(h)
            if tails is not None and run_len == self.lengths[-1]:
                tails[i] = (s.ids[:run_len], h[-self.target :].clone())  # ids (run_len,), (T, H)
            if summary:
                st = compare_summary(summ, head, h_ref, h, s.ids[:run_len], lin)
            else:
                st = compare(ref_head or ref.head, head, h_ref, h, s.ids[:run_len], self.cfg.chunk_size)
            for L in lengths:
                check_finite(method_id, L, i, st)
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
        from .findings import matched_growth
        from .gate import FLOOR_MIN, GROWTH_MIN_FLOORS

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
        lin = linear_head(model) if summary else None  # for reverse KL on the summary path
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
                        st = compare(ref_head, head, mref.hidden[L][i], h, x[-T:], self.cfg.chunk_size)
                    check_finite(method_id, L, i, st)
                    sts.append(st)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                msg = oom_message(f"measuring '{method_id}' (matched)", L, exc)
            else:
                per_len[L] = sts
                continue
            _release_memory()
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

    def anatomy_reference(self) -> list[Captured]:
        """The reference model's residual stream, keys and values per layer on the first `anatomy` samples at the
        longest length (anatomy.capture; CPU, the model's dtype), computed once per harness and before any method
        changes the model in place. Memory: samples × layers × length × (hidden + 2 · K/V width) values."""
        if self._anatomy_refs is None:
            t0 = time.perf_counter()
            refs = []
            for s in self.samples[: self.cfg.anatomy]:
                try:
                    with capture(self.lm.model) as got:
                        final_hidden(self.lm.model, s.ids[: self.lengths[-1]])
                except TypeError as exc:  # anatomy.probes: no decoder layers it can find; measure without
                    self.anatomy_note = f"no error anatomy: {exc}"
                    warnings.warn(self.anatomy_note, stacklevel=2)
                    refs = []
                    break
                refs.append(got)
            self._anatomy_refs = refs
            self._anatomy_ref_s = time.perf_counter() - t0
        return self._anatomy_refs

    @contextlib.contextmanager
    def _anatomy_tally(self) -> Iterator[ErrorTally | None]:
        """While active (the anatomy on), the window measurement's longest passes of the anatomy samples also
        compare every layer with the reference (`_measure_pass`); None when the anatomy is off."""
        refs = self.anatomy_reference() if self.cfg.anatomy else []
        self._tally = ErrorTally(refs) if refs else None
        try:
            yield self._tally
        finally:
            self._tally = None

    def _anatomy_rest(
        self, model: torch.nn.Module, tally: ErrorTally | None
    ) -> tuple[Anatomy | None, float, int]:
        """The anatomy of `model`, the seconds spent on extra forwards and their number: one per anatomy sample
        that the window measurement did not cover (a matched-only design, a longest pass out of memory)."""
        if tally is None:
            return None, 0.0, 0
        t0 = time.perf_counter()
        passes = 0
        for i in range(len(tally.refs)):
            if tally.done(i):
                continue
            passes += 1
            try:
                with tally.compare_to(model, i):
                    final_hidden(model, self.samples[i].ids[: tally.length])
            except Exception as exc:
                if not is_oom(exc):
                    raise
                warnings.warn(oom_message("computing the error anatomy", tally.length, exc), stacklevel=2)
                break
        return tally.result(), time.perf_counter() - t0, passes

    @torch.no_grad()
    def probe_reference(self) -> ProbeReference:
        """The reference's side of the probes (probes.ProbeReference), computed once per harness before any method
        changes the model in place: its per-position analysis (keytokens, where) from the longest pass and the
        short-context passes, the probe sequences and the reference's hidden states at their scored rows."""
        if self._probe_ref is None:
            cfg, ref = self.probe_cfg, self.reference
            t0 = time.perf_counter()
            seqs = None
            if cfg.sequence and ref.one_pass:
                seqs = probe_sequences(ref.samples, self.lengths, self.lm.tokenizer, cfg, self.cfg.seed)
            key = probe_cache_key(ref.key, cfg, seqs)
            path = Path(self.cfg.cache_dir or default_cache_dir()) / f"probes-{key[:32]}.safetensors"
            note = (
                "copy and passkey read one pass over the probe sequence, unsound for this model: skipped"
                if cfg.sequence and not ref.one_pass
                else None
            )
            with entry_lock(path) if self.cfg.use_cache else contextlib.nullcontext():
                self._probe_ref = self._probe_reference_locked(cfg, ref, seqs, key, path, note, t0)
        return self._probe_ref

    def _probe_reference_locked(
        self, cfg: Any, ref: Any, seqs: Any, key: str, path: Path, note: str | None, t0: float
    ) -> ProbeReference:
        """probe_reference's body under the cache entry's lock: read the entry, or compute and write it."""
        if self.cfg.use_cache:
            got = load_probe_reference(path, key, seqs, note)
            if got is not None:
                got.seconds = time.perf_counter() - t0
                return got
        P = max(ref.hidden)
        model, head, chunk = self.lm.model, ref.head, self.cfg.chunk_size
        analyses = None
        if cfg.reference_analysis:

            def long_blocks(h: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
                for s in range(0, h.shape[0], chunk):
                    yield s, head(h[s : s + chunk])  # (c, V)

            analyses = [
                analyse_reference(
                    s.ids[:P],
                    cfg.window,
                    lambda h=ref.hidden[P][i]: long_blocks(h),
                    lambda x, k: head(final_hidden(model, x)[-k:]),
                )
                for i, s in enumerate(ref.samples)
            ]
        rows_h = [final_hidden(model, q.ids)[q.rows].clone() for q in seqs] if seqs else None  # (n, H) each
        pr = ProbeReference(analyses, seqs, rows_h, time.perf_counter() - t0, note)
        if self.cfg.use_cache:
            save_probe_reference(path, key, pr)
        return pr

    @torch.no_grad()
    def _measure_probes(
        self, model: torch.nn.Module, keep: dict[int, Any], length_note: str | None
    ) -> tuple[dict[str, Any] | None, float]:
        """The probes of `model` (probes.summarize_probes) from the window pass's per-position values in `keep`
        and one pass over each sample's probe sequence; and the seconds spent. (None, 0) when the probes are off."""
        if self.probe_cfg is None or not keep:
            return None, 0.0
        t0 = time.perf_counter()
        pr = self.probe_reference()
        seqs, scores, notes = pr.sequences, None, [pr.note] if pr.note else []
        if seqs is not None and length_note:
            seqs, notes = (
                None,
                [*notes, "copy and passkey skipped: this model's outputs depend on the total length"],
            )
        if seqs is not None:
            head, ref_head = self.head(model), self._reference_head(model)
            scores = [
                score_rows(ref_head(rh), head(final_hidden(model, q.ids)[q.rows]), q.targets)
                for q, rh in zip(seqs, pr.rows_hidden, strict=True)
            ]
        out = summarize_probes(self.probe_cfg, self.lengths, keep, pr.analyses, seqs, scores)
        if notes:
            out["notes"] = [*out.get("notes", []), *notes]
        return out, time.perf_counter() - t0

    def _short_reference(self) -> list[torch.Tensor]:
        """Separate passes of the reference model over each sample's first `lengths[0]` tokens (cached)."""
        if self._short_ref is None:
            L0 = self.lengths[0]
            self._short_ref = [final_hidden(self.lm.model, s.ids[:L0]) for s in self.samples]
        return self._short_ref

    def float_noise(self, model: torch.nn.Module, stats: dict[int, LengthStats]) -> dict[str, float]:
        """Cross-run float noise of window KL at the shortest length: separate short passes of both models
        (other shapes, other kernels' summation order) against the measurement. 'absolute': the largest
        per-sample difference in nats; 'relative': that ÷ the mean (0 when the mean is 0)."""
        L0 = self.lengths[0]
        ref_head, head = self._reference_head(model), self.head(model)
        sts = [
            compare(ref_head, head, h, final_hidden(model, s.ids[:L0]), s.ids[:L0], self.cfg.chunk_size)
            for h, s in zip(self._short_reference(), self.samples, strict=True)
        ]
        short = summarize(L0, sts).per_sample["window_kl"]
        main = stats[L0].per_sample["window_kl"]
        absolute = max(abs(a - b) for a, b in zip(short, main, strict=True))
        mean = abs(sum(main) / len(main))
        return {"absolute": absolute, "relative": absolute / mean if mean > 0 else 0.0}

    def self_noise(self) -> float:
        """Window KL at the shortest length between the reference model and itself, run in separate passes
        (short passes against the prefix of the long one): the KL that float noise alone produces on this
        model, dtype and device (largest per-sample |value|, nats). The gate's floor is derived from it."""
        ref = self.reference
        L0 = self.lengths[0]
        P = max(p for p in ref.hidden if p >= L0)
        sts = [
            compare(ref.head, ref.head, ref.hidden[P][i][:L0], h, s.ids[:L0], self.cfg.chunk_size)
            for i, (h, s) in enumerate(zip(self._short_reference(), self.samples, strict=True))
        ]
        return max(abs(v) for v in summarize(L0, sts).per_sample["window_kl"])

    def sentinel(self) -> torch.Tensor:
        """The reference model's final hidden states on sample 0's first SENTINEL_TOKENS tokens, taken before
        the first method runs; `check_reference_intact` compares against it after each method."""
        if self._sentinel is None:
            self._sentinel = final_hidden(self.lm.model, self.samples[0].ids[:SENTINEL_TOKENS])
        return self._sentinel

    def check_reference_intact(self, method_id: str) -> None:
        """MethodRunError when the reference model's output moved since `sentinel()` (max per-position KL
        above the length-probe tolerance of its dtype): the method changed the model or global state."""
        before = self.sentinel()
        ids = self.samples[0].ids[: before.shape[0]]
        now = final_hidden(self.lm.model, ids)
        head = self._base_head()
        worst = (
            float(compare(head, head, before, now, ids).kl.abs().max()) if now.shape == before.shape else 1.0
        )
        if not worst <= LENGTH_PROBE_TOL.get(self.lm.dtype, 5e-3):
            raise MethodRunError(
                f"method '{method_id}' changed the reference model or global state: the uncompressed model's "
                f"output on a {ids.shape[0]}-token probe moved (max KL {worst:.3g}) since the run started; "
                "its results, and those of methods after it, are not trusted — a method must change only its "
                "own copy (no monkeypatching of classes or globals)"
            )

    def run(self, method: Method | str, noise_probe: bool = False) -> MethodResult:
        """Compress a copy, measure it; with `noise_probe`, also measure the float noise (see float_noise)."""
        m = parse_method(method) if isinstance(method, str) else method
        if "torch" not in m.engines:
            from .methods.llamacpp import engine_only

            raise MethodError(engine_only(m.id, "llama.cpp"))
        window = self.cfg.design != "matched"
        _ = self.reference if window else None  # built (or loaded) before compressing
        mref = self.matched_reference if self.cfg.design != "window" else None
        if noise_probe and window:
            self._short_reference()  # from the reference model, before a method changes it in place
        if self.cfg.anatomy:
            self.anatomy_reference()  # likewise
        if self.probe_cfg is not None:
            self.probe_reference()  # likewise
        keep: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        with self.compressed(m) as (model, ctx, t_compress), self._anatomy_tally() as tally:
            stats, errors, length_note, t_measure, tails = (
                self._measure_window(model, m.id, keep) if window else ({}, {}, None, 0.0, None)
            )
            probes = self._measure_probes(model, keep, length_note)
            if noise_probe and window:
                ctx.info["float_noise"] = self.float_noise(model, stats)
            matched, t_matched = (
                self._measure_matched_timed(model, m.id, tails) if mref is not None else (None, 0.0)
            )
            anatomy = self._anatomy_rest(model, tally)
            del model
        self.check_reference_intact(m.id)
        return self._result(
            m.id,
            stats,
            errors,
            length_note,
            matched,
            t_compress,
            t_measure,
            t_matched,
            ctx.info,
            anatomy,
            probes,
        )

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

    def _result(
        self,
        method_id: str,
        stats: dict[int, LengthStats],
        errors: dict[int, str],
        length_note: str | None,
        matched: MatchedCurves | None,
        t_compress: float,
        t_measure: float,
        t_matched: float,
        method_info: dict[str, Any],
        anatomy: tuple[Anatomy | None, float, int] = (None, 0.0, 0),
        probes: tuple[dict[str, Any] | None, float] = (None, 0.0),
    ) -> MethodResult:
        """The MethodResult of a measured method or checkpoint (window curves, matched curves or both)."""
        window = self.cfg.design != "matched"
        ref, mref = self._reference, self._matched_ref
        first = ref if window else mref  # matched only: its reference is the run's reference
        timings: dict[str, Any] = {
            "reference_s": first.seconds,
            "reference_cache_hit": first.cache_hit,
            "compression_s": t_compress,
            "measurement_s": t_measure,
        }
        if matched is not None:
            timings |= {
                "matched_reference_s": mref.seconds,
                "matched_reference_cache_hit": mref.cache_hit,
                "matched_measurement_s": t_matched,
            }
        if anatomy[0] is not None:
            timings |= {
                "anatomy_reference_s": self._anatomy_ref_s,
                "anatomy_extra_s": anatomy[1],
                "anatomy_extra_passes": anatomy[2],
            }
        if probes[0] is not None:
            timings |= {"probe_reference_s": self._probe_ref.seconds, "probe_s": probes[1]}
        mode = ("one-pass" if ref.one_pass and not length_note else "per-length") if window else "matched"
        return MethodResult(
            method=method_id,
            model=self.cfg.model,
            lengths=self.lengths,
            stats=stats,
            mode=mode,
            timings=timings,
            info={
                "method_info": dict(method_info),
                **self.metadata(),
                **({"length_dependent": length_note} if length_note else {}),
            },
            errors=errors if self.cfg.design != "matched" else dict(matched.errors),
            matched=matched,
            anatomy=anatomy[0],
            probes=probes[0],
        )

    def run_checkpoint(
        self, model: torch.nn.Module, name: str, load_s: float = 0.0, info: dict[str, Any] | None = None
    ) -> MethodResult:
        """Measure an already compressed model (a checkpoint checked by `checkpoint.load_compressed`) as method
        `name`: the measurement and result of `run`, with its load time as compression time and `info` as its
        method facts."""
        window = self.cfg.design != "matched"
        _ = self.reference if window else None  # built before the measurement is timed
        _ = self.matched_reference if self.cfg.design != "window" else None
        self.sentinel()
        if self.probe_cfg is not None:
            self.probe_reference()
        model.eval()
        keep: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        with self._anatomy_tally() as tally:
            stats, errors, length_note, t_measure, tails = (
                self._measure_window(model, name, keep) if window else ({}, {}, None, 0.0, None)
            )
            probes = self._measure_probes(model, keep, length_note)
            matched, t_matched = (
                self._measure_matched_timed(model, name, tails)
                if self.cfg.design != "window"
                else (None, 0.0)
            )
            anatomy = self._anatomy_rest(model, tally)
        self.check_reference_intact(name)
        return self._result(
            name,
            stats,
            errors,
            length_note,
            matched,
            load_s,
            t_measure,
            t_matched,
            info or {},
            anatomy,
            probes,
        )

    def metadata(self) -> dict[str, Any]:
        import transformers

        md: dict[str, Any] = {
            "harness_version": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "model_source": self.lm.source,
            "dtype": dtype_name(self.lm.dtype),
            "device_type": self.lm.device_type,
            "corpus": self.corpus.name,
            "corpus_sha256": self.corpus.fingerprint,
            "seed": self.cfg.seed,
            "samples": [s.span.to_dict() for s in self.samples],
        }
        if self._calibration is not None:
            md["calibration"] = {
                "count": self.cfg.calib_samples,
                "length": self.cfg.calib_length,
                "spans": [s.span.to_dict() for s in self._calibration],
            }
        notes = list(self._reference.notes) if self._reference is not None else []
        if self.head_note:
            notes.append(self.head_note)
        if self.anatomy_note:
            notes.append(self.anatomy_note)
        if notes:
            md["notes"] = notes
        return md
