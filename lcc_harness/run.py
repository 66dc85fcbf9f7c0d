"""Orchestration shared by the CLI and the pytest plugin.

model + corpus → samples → reference (cached) → copy + method → measure → MethodResult.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__
from .baselines import write_json_atomic  # noqa: F401 - re-exported: the CLI writes --json with it
from .corpus import Sample, TokenizedCorpus, load_corpus
from .errors import HarnessError, LengthError, MethodRunError, NonFiniteError, OOMError
from .measure import (
    DEFAULT_CHUNK,
    LengthStats,
    PositionStats,
    check_finite,
    compare,
    compare_summary,
    final_hidden,
    output_head,
    shared_linear_head,
    summarize,
)
from .methods.registry import CompressContext, Method, parse_method
from .models import LoadedModel, dtype_name, load_model
from .reference import Reference, build_reference
from .targets import DEFAULT_INCLUDE


@dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on. Lengths are validated by `validate_lengths`."""

    model: str = "smollm2-135m"
    lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    samples: int = 2
    corpus: str | None = None
    text_field: str = "text"
    device: str = "auto"
    dtype: str | None = None
    seed: int = 0
    calib_samples: int = 8
    calib_length: int = 512
    naive: bool = False
    chunk_size: int = DEFAULT_CHUNK
    cache_dir: str | None = None
    use_cache: bool = True
    allow_extrapolation: bool = False
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    progress: bool = False
    # Summarize the reference's next-token distributions once per reference (RefSummary, cached with it)
    # instead of recomputing its LM head for every method; used for every compressed model that shares the
    # reference's LM head, the others take the direct path (`compare`). Same KL by algebra; float32
    # rounding differs (window KL within 1e-5 relative on SmolLM2, bench/). False: always the direct path.
    reference_summary: bool = True


def parse_lengths(text: str | Sequence[Any]) -> tuple[int, ...]:
    """'256,512' or a sequence → sorted tuple of positive, distinct ints; anything else is a LengthError."""
    items = [x.strip() for x in text.split(",")] if isinstance(text, str) else list(text)
    out = []
    for x in items:
        try:
            if isinstance(x, float) or (isinstance(x, str) and not x.lstrip("-").isdigit()):
                raise ValueError
            v = int(x)
        except (TypeError, ValueError):
            raise LengthError(
                f"context length '{x}' is not an integer; pass lengths like 256,512,1024"
            ) from None
        if v <= 0:
            raise LengthError(f"context length {v} must be positive; pass lengths like 256,512,1024")
        out.append(v)
    if not out:
        raise LengthError("no context lengths given; pass lengths like 256,512,1024")
    dup = sorted({v for v in out if out.count(v) > 1})
    if dup:
        raise LengthError(f"context length(s) {dup} given more than once; list each length once")
    return tuple(sorted(out))


def validate_lengths(
    lengths: Sequence[int], max_positions: int, model: str, allow_extrapolation: bool
) -> None:
    too_long = [n for n in lengths if n > max_positions]
    if too_long and not allow_extrapolation:
        raise LengthError(
            f"length(s) {too_long} exceed {model}'s maximum of {max_positions} positions; drop them or "
            "pass --allow-extrapolation to measure beyond the trained context"
        )


def is_oom(exc: BaseException) -> bool:
    """True for torch's OutOfMemoryError, MemoryError, and RuntimeErrors that say they ran out of memory
    (CUDA: 'out of memory'; CPU allocator: "can't allocate memory")."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_message(what: str, length: int | None, exc: BaseException) -> str:
    """One line: what ran out of memory, at which length, and what to reduce."""
    at = f" at length {length}" if length is not None else ""
    return (
        f"out of memory {what}{at} ({_first_line(exc)}); measure shorter or fewer lengths"
        f"{f' (drop {length} and longer)' if length is not None else ''}, lower the LM-head chunk size "
        "(--chunk-size / --lcc-chunk-size), or use a device with more memory"
    )


@dataclass
class MethodResult:
    """One method measured against the reference: curves per length, provenance and timings.

    `errors` maps a length that could not be measured (out of memory) to its message; `stats` lacks it.
    """

    method: str
    model: str
    lengths: tuple[int, ...]
    stats: dict[int, LengthStats]
    mode: str
    timings: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model": self.model,
            "lengths": list(self.lengths),
            "mode": self.mode,
            "curves": {str(L): s.to_dict() for L, s in self.stats.items()},
            "timings": self.timings,
            **({"errors": {str(L): e for L, e in self.errors.items()}} if self.errors else {}),
            **self.info,
        }


class Harness:
    """Loads the model and corpus once, builds the reference once, and measures methods against it."""

    def __init__(self, cfg: RunConfig, lm: LoadedModel | None = None) -> None:
        self.cfg = cfg
        self.lm = lm or load_model(cfg.model, cfg.device, cfg.dtype)
        self.lengths = parse_lengths(cfg.lengths)
        validate_lengths(self.lengths, self.lm.max_positions, cfg.model, cfg.allow_extrapolation)
        self.corpus = load_corpus(cfg.corpus, cfg.text_field)
        self.tokens = TokenizedCorpus(self.corpus, self.lm.tokenizer)
        self.samples = self.tokens.draw(cfg.samples, self.lengths[-1], cfg.seed)
        self._calibration: list[Sample] | None = None
        self._reference: Reference | None = None
        self._short_ref: list[torch.Tensor] | None = None

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
    def reference(self) -> Reference:
        if self._reference is None:
            try:
                self._reference = build_reference(
                    self.lm,
                    self.samples,
                    self.lengths,
                    naive=self.cfg.naive,
                    cache_dir=self.cfg.cache_dir,
                    use_cache=self.cfg.use_cache,
                    progress=self.cfg.progress,
                    summary_chunk=self.cfg.chunk_size if self.cfg.reference_summary else None,
                )
            except Exception as exc:
                if not is_oom(exc):
                    raise
                msg = oom_message("computing the reference", self.lengths[-1], exc)
            else:
                return self._reference
            _release_memory()
            raise OOMError(msg)
        return self._reference

    def compress(self, method: Method | str) -> tuple[torch.nn.Module, CompressContext, float]:
        """A compressed copy of the reference model, its context (with method info) and the seconds taken."""
        m = parse_method(method) if isinstance(method, str) else method
        t0 = time.perf_counter()
        calib = tuple(s.ids for s in self.calibration) if m.needs_calibration else ()
        ctx = CompressContext(
            calibration=calib, include=self.cfg.include, exclude=self.cfg.exclude, seed=self.cfg.seed
        )
        model = copy.deepcopy(self.lm.model)
        try:
            model = m.apply(model, ctx) or model
        except HarnessError:
            raise
        except Exception as exc:  # a method's own bug or limit: one line naming the method
            if not is_oom(exc):
                raise MethodRunError(
                    f"method '{m.id}' raised {_first_line(exc)} while compressing; fix the "
                    "method or leave it out (set LCC_DEBUG=1 or pass --debug for the "
                    "traceback)"
                ) from exc
            msg = oom_message(f"compressing with '{m.id}'", None, exc)
        else:
            msg = None
        if msg is not None:
            del model
            _release_memory()
            raise OOMError(msg)
        with torch.no_grad():
            for name, p in model.named_parameters():
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
        stats, errors = self.measure_lengths(model, method_id)
        if errors:
            raise OOMError(errors[min(errors)])
        return stats

    def measure_lengths(
        self, model: torch.nn.Module, method_id: str
    ) -> tuple[dict[int, LengthStats], dict[int, str]]:
        """Per-length statistics, plus length → message for lengths that ran out of memory.

        A one-pass run that runs out of memory falls back to one pass per shorter length, shortest first, so
        the lengths that fit are still measured; once a length fails, longer ones are not tried."""
        from tqdm.auto import tqdm

        ref = self.reference
        head = output_head(model)
        summary = bool(ref.summaries) and shared_linear_head(self.lm.model, model)
        per_len: dict[int, list[PositionStats]] = {}
        errors: dict[int, str] = {}
        passes = ref.passes()
        bar = tqdm(
            total=len(passes) * len(ref.samples), desc=method_id, disable=not self.cfg.progress, leave=False
        )

        def attempt(P: int, run_len: int, lens: tuple[int, ...]) -> None:
            if errors:
                for L in lens:
                    errors[L] = (
                        f"'{method_id}' not measured at length {L}: length {min(errors)} ran out of memory"
                    )
                return
            try:
                sts = self._measure_pass(model, head, ref, P, run_len, lens, method_id, summary)
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
        return {L: summarize(L, per_len[L]) for L in self.lengths if L in per_len}, dict(
            sorted(errors.items())
        )

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
    ) -> list[PositionStats]:
        """Each sample's first `run_len` tokens through `model`, compared with reference pass P (or its
        RefSummary when `summary`); NaN/Inf at any of `lengths` raises NonFiniteError."""
        out = []
        for i, s in enumerate(ref.samples):
            h_ref = ref.hidden[P][i][:run_len]
            if summary:
                summ = ref.summaries[P][i].prefix(run_len)
            h = final_hidden(model, s.ids[:run_len])  # (run_len, H)
            if summary:
                st = compare_summary(summ, head, h_ref, h, s.ids[:run_len])
            else:
                st = compare(ref.head, head, h_ref, h, s.ids[:run_len], self.cfg.chunk_size)
            for L in lengths:
                check_finite(method_id, L, i, st)
            out.append(st)
        return out

    def float_noise(self, model: torch.nn.Module, stats: dict[int, LengthStats]) -> float:
        """Relative float noise: window KL at the shortest length from separate short passes of both models,
        compared with the same statistic from the measurement (max over samples, relative to the mean)."""
        L0 = self.lengths[0]
        if self._short_ref is None:
            self._short_ref = [final_hidden(self.lm.model, s.ids[:L0]) for s in self.samples]
        ref_head, head = output_head(self.lm.model), output_head(model)
        sts = [
            compare(ref_head, head, h, final_hidden(model, s.ids[:L0]), s.ids[:L0], self.cfg.chunk_size)
            for h, s in zip(self._short_ref, self.samples, strict=True)
        ]
        short = summarize(L0, sts).per_sample["window_kl"]
        main = stats[L0].per_sample["window_kl"]
        scale = max(abs(sum(main) / len(main)), 1e-12)
        return max(abs(a - b) for a, b in zip(short, main, strict=True)) / scale

    def run(self, method: Method | str, noise_probe: bool = False) -> MethodResult:
        """Compress a copy, measure it; with `noise_probe`, also measure the float noise (see float_noise)."""
        m = parse_method(method) if isinstance(method, str) else method
        ref = self.reference
        model, ctx, t_compress = self.compress(m)
        t0 = time.perf_counter()
        try:
            stats, errors = self.measure_lengths(model, m.id)
            if not stats:  # not even the shortest length fits
                raise OOMError(errors[min(errors)])
            t_measure = time.perf_counter() - t0
            if noise_probe:
                ctx.info["float_noise"] = self.float_noise(model, stats)
        finally:
            del model
        return MethodResult(
            method=m.id,
            model=self.cfg.model,
            lengths=self.lengths,
            stats=stats,
            mode="one-pass" if ref.one_pass else "per-length",
            timings={
                "reference_s": ref.seconds,
                "reference_cache_hit": ref.cache_hit,
                "compression_s": t_compress,
                "measurement_s": t_measure,
            },
            info={"method_info": dict(ctx.info), **self.metadata()},
            errors=errors,
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
        if self._reference is not None and self._reference.notes:
            md["notes"] = list(self._reference.notes)
        return md
