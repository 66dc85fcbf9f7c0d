"""What a run is asked and what it returns, whatever the engine: RunConfig (the typed configuration the CLI and
the plugin build once), MethodResult and MatchedCurves (the records a method's measurement produces), and the
checks and messages both engines share (lengths, out-of-memory)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lcc_harness.errors import LengthError, first_line
from lcc_harness.measure.anatomy import Anatomy
from lcc_harness.measure.kl import DEFAULT_CHUNK, LengthStats
from lcc_harness.methods._targets import DEFAULT_INCLUDE


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
    # Compress the loaded model in place and restore it from a host copy after each method (one model on the
    # device; snapshot.Snapshot). False: compress a deep copy (two models on the device).
    in_place: bool = True
    # Which curves to measure (options.DESIGNS): 'window' (KL over positions (L/2, L] of one pass; the gate, the
    # baselines and the findings read these), 'matched' (each sample's last `target_tokens` tokens scored at every
    # length L with the L tokens that end there: one pass per length), or 'both'.
    design: str = "window"
    # Matched design: T, the target tokens per sample (default: half the shortest length).
    target_tokens: int | None = None
    # Error anatomy (anatomy.py) on the first `anatomy` samples at the longest length: per layer and log2
    # position bucket, the relative error of the residual stream, keys and values. 0: off.
    anatomy: int = 0
    # Which engine runs the forward passes (engines/): 'torch' (this Harness) or 'llama.cpp' (GGUF files through
    # llama.cpp's kernels, engines.llamacpp.LlamaCppHarness). The llama.cpp engine's own settings: CPU threads
    # (0: the physical cores), layers offloaded to a GPU (None: all when the build has a GPU backend and the
    # device allows it, else 0), and an importance matrix for its quantizer.
    engine: str = "torch"
    threads: int = 0
    gpu_layers: int | None = None
    imatrix: str | None = None
    # Long-range probes (probes.PROBES: keytokens, copy, passkey, where) measured beside the window curves; () off
    probes: tuple[str, ...] = ()
    # Also compute reverse KL(P_cmp ‖ P_ref) (informational, never gated). Off by default: on the torch engine's
    # summary path it needs the compressed model's expected output embedding, a second (T, V) × (V, H) product,
    # ~0.11 of a forward per sample at 8192 tokens on SmolLM2 (bench/stats_cost.py).
    reverse_kl: bool = False


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


def oom_message(what: str, length: int | None, exc: BaseException) -> str:
    """One line: what ran out of memory, at which length, and what to reduce."""
    at = f" at length {length}" if length is not None else ""
    return (
        f"out of memory {what}{at} ({first_line(exc)}); measure shorter or fewer lengths"
        f"{f' (drop {length} and longer)' if length is not None else ''}, lower the LM-head chunk size "
        "(--chunk-size), or use a device with more memory"
    )


@dataclass
class MatchedCurves:
    """The matched-target curves of one method: per length L, statistics over the same T target tokens of each
    sample (its last T), read with the L tokens that end there (`LengthStats` whose window is the target span:
    window_kl = mean KL over the target, per_sample['window_kl'] = KL_i(L)); growth = findings.MatchedGrowth as a
    dict; errors: length → message for lengths that ran out of memory."""

    target_tokens: int
    stats: dict[int, LengthStats]
    growth: dict[str, Any]
    errors: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_tokens": self.target_tokens,
            "curves": {str(L): s.to_dict() for L, s in self.stats.items()},
            "growth": self.growth,
            **({"errors": {str(L): e for L, e in self.errors.items()}} if self.errors else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MatchedCurves:
        return cls(
            target_tokens=int(d["target_tokens"]),
            stats={int(L): LengthStats(**c) for L, c in d["curves"].items()},
            growth=dict(d.get("growth") or {}),
            errors={int(L): e for L, e in (d.get("errors") or {}).items()},
        )


@dataclass
class MethodResult:
    """One method measured against the reference: curves per length, provenance and timings.

    `errors` maps a length that could not be measured (out of memory) to its message; `stats` lacks it.
    `matched`: the matched-target curves when the run's design asked for them (`stats` is empty when it asked
    for them only).
    """

    method: str
    model: str
    lengths: tuple[int, ...]
    stats: dict[int, LengthStats]
    mode: str
    timings: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    matched: MatchedCurves | None = None
    anatomy: Anatomy | None = None
    # the long-range probes (probes.summarize_probes: config, per-length cells, notes); None when off
    probes: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model": self.model,
            "lengths": list(self.lengths),
            "mode": self.mode,
            "curves": {str(L): s.to_dict() for L, s in self.stats.items()},
            "timings": self.timings,
            **({"errors": {str(L): e for L, e in self.errors.items()}} if self.errors else {}),
            **({"matched": self.matched.to_dict()} if self.matched is not None else {}),
            **({"anatomy": self.anatomy.to_dict()} if self.anatomy is not None else {}),
            **({"probes": self.probes} if self.probes is not None else {}),
            **self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodResult:
        """The inverse of `to_dict` (a result another process computed; see share.RunStore)."""
        known = {
            "method",
            "model",
            "lengths",
            "mode",
            "curves",
            "timings",
            "errors",
            "matched",
            "anatomy",
            "probes",
        }
        return cls(
            method=d["method"],
            model=d["model"],
            lengths=tuple(int(L) for L in d["lengths"]),
            stats={int(L): LengthStats(**c) for L, c in d["curves"].items()},
            mode=d["mode"],
            timings=dict(d["timings"]),
            info={k: v for k, v in d.items() if k not in known},
            errors={int(L): e for L, e in (d.get("errors") or {}).items()},
            matched=MatchedCurves.from_dict(d["matched"]) if d.get("matched") else None,
            anatomy=Anatomy.from_dict(d["anatomy"]) if d.get("anatomy") else None,
            probes=dict(d["probes"]) if d.get("probes") else None,
        )
