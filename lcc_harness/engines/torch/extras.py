"""The extra passes: error anatomy, long-range probes, float noise and the reference sentinel"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
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
)
from lcc_harness.files import entry_lock
from lcc_harness.measure.anatomy import Anatomy, Captured, ErrorTally, capture
from lcc_harness.measure.head import final_hidden
from lcc_harness.measure.kl import LengthStats, compare, summarize
from lcc_harness.measure.probe_scores import score_rows, summarize_probes
from lcc_harness.measure.probes import ProbeReference, analyse_reference, probe_sequences
from lcc_harness.measure.probes import (
    cache_key as probe_cache_key,
)
from lcc_harness.measure.probes import (
    load_reference as load_probe_reference,
)
from lcc_harness.measure.probes import (
    save_reference as save_probe_reference,
)
from lcc_harness.measure.reference import (
    LENGTH_PROBE_TOL,
    default_cache_dir,
)

SENTINEL_TOKENS = 64  # tokens of the probe that re-checks the reference model after each method


class ExtraPasses:
    """Harness's the extra passes (a part of Harness; it reads the harness's state)."""

    def anatomy_reference(self) -> list[Captured]:
        """The reference model's residual stream, keys and values per layer on the first `anatomy` samples at the
        longest length (anatomy.capture; CPU, 2 bytes a value), computed once per harness and before any method
        changes the model in place. Memory: samples × layers × length × (hidden + 2 · K/V width) × 2 bytes."""
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
