"""Orchestration shared by the CLI and the pytest plugin.

model + corpus → samples → reference (cached) → copy + method → measure → MethodResult.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .corpus import Sample, TokenizedCorpus, load_corpus
from .errors import LengthError
from .measure import DEFAULT_CHUNK, LengthStats, PositionStats, check_finite, compare, final_hidden, output_head, summarize
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
            raise LengthError(f"context length '{x}' is not an integer; pass lengths like 256,512,1024") from None
        if v <= 0:
            raise LengthError(f"context length {v} must be positive; pass lengths like 256,512,1024")
        out.append(v)
    if not out:
        raise LengthError("no context lengths given; pass lengths like 256,512,1024")
    dup = sorted({v for v in out if out.count(v) > 1})
    if dup:
        raise LengthError(f"context length(s) {dup} given more than once; list each length once")
    return tuple(sorted(out))


def validate_lengths(lengths: Sequence[int], max_positions: int, model: str, allow_extrapolation: bool) -> None:
    too_long = [L for L in lengths if L > max_positions]
    if too_long and not allow_extrapolation:
        raise LengthError(
            f"length(s) {too_long} exceed {model}'s maximum of {max_positions} positions; drop them or "
            "pass --allow-extrapolation to measure beyond the trained context"
        )


@dataclass
class MethodResult:
    """One method measured against the reference: curves per length, provenance and timings."""

    method: str
    model: str
    lengths: tuple[int, ...]
    stats: dict[int, LengthStats]
    mode: str
    timings: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model": self.model,
            "lengths": list(self.lengths),
            "mode": self.mode,
            "curves": {str(L): s.to_dict() for L, s in self.stats.items()},
            "timings": self.timings,
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
            self._calibration = self.tokens.draw(self.cfg.calib_samples, self.cfg.calib_length,
                                                 self.cfg.seed + 1, exclude=[s.span for s in self.samples],
                                                 purpose="calibration")
        return self._calibration

    @property
    def reference(self) -> Reference:
        if self._reference is None:
            self._reference = build_reference(self.lm, self.samples, self.lengths, naive=self.cfg.naive,
                                              cache_dir=self.cfg.cache_dir, use_cache=self.cfg.use_cache,
                                              progress=self.cfg.progress)
        return self._reference

    def compress(self, method: Method | str) -> tuple[torch.nn.Module, CompressContext, float]:
        """A compressed copy of the reference model, its context (with method info) and the seconds taken."""
        m = parse_method(method) if isinstance(method, str) else method
        t0 = time.perf_counter()
        calib = tuple(s.ids for s in self.calibration) if m.needs_calibration else ()
        ctx = CompressContext(calibration=calib, include=self.cfg.include, exclude=self.cfg.exclude,
                              seed=self.cfg.seed)
        model = copy.deepcopy(self.lm.model)
        model = m.apply(model, ctx) or model
        model.eval()
        return model, ctx, time.perf_counter() - t0

    def measure_model(self, model: torch.nn.Module, method_id: str) -> dict[int, LengthStats]:
        """Per-length statistics of `model` against the reference (one pass per sample unless naive)."""
        from tqdm.auto import tqdm

        ref = self.reference
        head = output_head(model)
        per_len: dict[int, list[PositionStats]] = {L: [] for L in self.lengths}
        passes = ref.passes()
        bar = tqdm(total=len(passes) * len(ref.samples), desc=method_id, disable=not self.cfg.progress,
                   leave=False)
        for P, covered in passes.items():
            for i, s in enumerate(ref.samples):
                h = final_hidden(model, s.ids[:P])  # (P, H)
                st = compare(ref.head, head, ref.hidden[P][i], h, s.ids[:P], self.cfg.chunk_size)
                for L in covered:
                    check_finite(method_id, L, i, st)
                    per_len[L].append(st)
                bar.update()
        bar.close()
        return {L: summarize(L, sts) for L, sts in per_len.items()}

    def float_noise(self, model: torch.nn.Module, stats: dict[int, LengthStats]) -> float:
        """Relative float noise: window KL at the shortest length from separate short passes of both models,
        compared with the same statistic from the measurement (max over samples, relative to the mean)."""
        L0 = self.lengths[0]
        if self._short_ref is None:
            self._short_ref = [final_hidden(self.lm.model, s.ids[:L0]) for s in self.samples]
        ref_head, head = output_head(self.lm.model), output_head(model)
        sts = [compare(ref_head, head, h, final_hidden(model, s.ids[:L0]), s.ids[:L0], self.cfg.chunk_size)
               for h, s in zip(self._short_ref, self.samples, strict=True)]
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
            stats = self.measure_model(model, m.id)
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
            timings={"reference_s": ref.seconds, "reference_cache_hit": ref.cache_hit,
                     "compression_s": t_compress, "measurement_s": t_measure},
            info={"method_info": dict(ctx.info), **self.metadata()},
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
            md["calibration"] = {"count": self.cfg.calib_samples, "length": self.cfg.calib_length,
                                 "spans": [s.span.to_dict() for s in self._calibration]}
        if self._reference is not None and self._reference.notes:
            md["notes"] = list(self._reference.notes)
        return md


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON (sorted keys, indented) so that the file is either the old one or complete."""
    import json
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
