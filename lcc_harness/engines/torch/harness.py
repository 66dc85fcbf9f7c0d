"""Orchestration shared by the CLI and the pytest plugin.

model + corpus → samples → reference (cached) → copy + method → measure → MethodResult.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lcc_harness import __version__
from lcc_harness.engines.results import (
    MatchedCurves,
    MethodResult,
    RunConfig,
    is_oom,
    oom_message,
    validate_lengths,
)
from lcc_harness.engines.torch.curves import Curves, release_memory
from lcc_harness.engines.torch.extras import ExtraPasses
from lcc_harness.errors import (
    HarnessError,
    LengthError,
    MethodError,
    MethodRunError,
    NonFiniteError,
    OOMError,
    first_line,
)
from lcc_harness.measure.anatomy import Anatomy, Captured, ErrorTally
from lcc_harness.measure.head import check_head, output_head, own_logits_head
from lcc_harness.measure.kl import Head, LengthStats
from lcc_harness.measure.probes import (
    ProbeConfig,
    ProbeReference,
    check_probe_lengths,
)
from lcc_harness.measure.reference import (
    MatchedReference,
    Reference,
    build_matched_reference,
    build_reference,
)
from lcc_harness.methods._targets import linearize_conv1d
from lcc_harness.methods.registry import CompressContext, Method, parse_method
from lcc_harness.models.corpus import Sample, TokenizedCorpus, load_corpus
from lcc_harness.models.load import LoadedModel, all_finite, dtype_name, load_model, plain_values
from lcc_harness.models.snapshot import Snapshot
from lcc_harness.options import (  # parse_lengths re-exported: the CLI and tests use it here
    DESIGNS,
    parse_lengths,
)


def _check_head(model: torch.nn.Module, ids: torch.Tensor) -> str | None:
    """measure.check_head, its TypeError as a HarnessError (the model's logits cannot be reproduced)."""
    try:
        return check_head(model, ids)
    except TypeError as exc:
        raise HarnessError(f"{exc}; this model family is not supported") from None


class Harness(ExtraPasses, Curves):
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
        self.lm = lm or load_model(cfg.model, cfg.device, cfg.dtype, cfg.cache_dir)
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
        release_memory()
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
            release_memory()
            raise OOMError(msg)
        with torch.no_grad():
            for name, param in model.named_parameters():
                p = plain_values(param)  # an adapter's -kernel mode leaves a library's tensor subclass
                if p.is_floating_point() and not all_finite(p):
                    raise NonFiniteError(
                        f"method '{m.id}' wrote non-finite values (NaN/Inf) into {name}; "
                        "the compressed weights must be finite"
                    )
        model.eval()
        return model, ctx, time.perf_counter() - t0

    def run(self, method: Method | str, noise_probe: bool = False) -> MethodResult:
        """Compress a copy, measure it; with `noise_probe`, also measure the float noise (see float_noise)."""
        m = parse_method(method) if isinstance(method, str) else method
        if "torch" not in m.engines:
            from lcc_harness.methods.llamacpp import engine_only

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
