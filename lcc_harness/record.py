"""The run record: what a pytest session produces (run metadata, per-method outcomes and curves, checks, growth,
baselines, findings) as the JSON-ready mapping the plugin assembles and the reports read. These accessors are the
one place that knows its layout; `RunRecord` / `MethodOutcome` are its typed form, which the session builds, xdist
workers send and the controller merges (the reports render `RunRecord.public()`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def methods(record: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(record.get("methods") or {})


def curves(entry: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """A method's curves keyed by int length (the record keys them by str for JSON); 'partial' methods
    (some lengths ran out of memory) have curves for the lengths that were measured."""
    if entry.get("status", "ok") not in ("ok", "partial"):
        return {}
    return {int(k): v for k, v in (entry.get("curves") or {}).items()}


def matched(entry: Mapping[str, Any]) -> tuple[int | None, dict[int, dict[str, Any]], dict[str, Any]]:
    """A method's matched-target curves: (target tokens, curves keyed by int length, growth); (None, {}, {}) for a
    record or method without them (a window-only run, an older record, a method that failed)."""
    m = entry.get("matched")
    if entry.get("status", "ok") not in ("ok", "partial") or not isinstance(m, Mapping):
        return None, {}, {}
    cs = {int(k): v for k, v in (m.get("curves") or {}).items() if isinstance(v, Mapping)}
    g = m.get("growth")
    return m.get("target_tokens"), cs, dict(g) if isinstance(g, Mapping) else {}


def anatomy(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """A method's error anatomy (anatomy.Anatomy.to_dict); None for a record or method without one."""
    a = entry.get("anatomy")
    if entry.get("status", "ok") not in ("ok", "partial") or not isinstance(a, Mapping) or not a.get("error"):
        return None
    return dict(a)


def lengths(record: Mapping[str, Any]) -> list[int]:
    """Run lengths plus any length some curve has, ascending."""
    found = {int(L) for L in (record.get("run") or {}).get("lengths") or []}
    for entry in methods(record).values():
        found.update(curves(entry))
    return sorted(found)


def baseline_kl(record: Mapping[str, Any], method: str, length: int) -> float | None:
    curves = ((record.get("baselines") or {}).get(method) or {}).get("curves") or {}
    point = curves.get(str(length), curves.get(length))
    v = point.get("window_kl") if isinstance(point, Mapping) else None
    return float(v) if finite(v) else None


def run_title(run: Mapping[str, Any]) -> str:
    return f"{run.get('model', '?')} ({run.get('dtype', '?')}, {run.get('device_type', '?')})"


def bits(entry: Mapping[str, Any]) -> Any:
    return (entry.get("method_info") or {}).get("effective_bits")


def died_message(method_id: str, who: str) -> str:
    return (
        f"the process that was running '{method_id}' ({who}) died before finishing it (killed by a signal, "
        "the out-of-memory killer, or the method ended the process); its cases fail, the other methods go on"
    )


def outliers(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """The method's record of the outlier weights it changed (outliers.OutlierTally.record), None if absent."""
    out = (entry.get("method_info") or {}).get("outliers")
    return dict(out) if isinstance(out, Mapping) else None


def super_weights_zeroed(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The super weights (zeroed, beyond k_super σ) the method zeroed, largest first; [] if none or unknown."""
    return [dict(x) for x in (entry.get("method_info") or {}).get("super_weights_zeroed") or []]


# ---- the typed record ---------------------------------------------------------------------------------------
RECORD_SCHEMA = "lcc-record/1"
RECORD_FILE = "lcc-record.json"  # the full record, beside each report (what `lcc merge` joins)
_STAGED = ("entries", "staged_findings", "spec", "identity", "floor")


@dataclass
class MethodOutcome:
    """One method in a run: status ok | partial (some lengths out of memory) | error | non-finite; its curves keyed
    by length as a string (LengthStats.to_dict), timings, method facts, and how it was measured."""

    status: str
    error: str = ""
    curves: dict[str, dict[str, Any]] | None = None
    timings: dict[str, Any] | None = None
    method_info: dict[str, Any] | None = None
    mode: str | None = None
    length_dependent: str | None = None
    # matched-target curves (run.MatchedCurves.to_dict: target_tokens, curves by str length, growth, errors);
    # None when the run's design measured window curves only
    matched: dict[str, Any] | None = None
    # error anatomy (anatomy.Anatomy.to_dict: relative errors per layer and position bucket); None when off
    anatomy: dict[str, Any] | None = None
    # the long-range probes (probes.summarize_probes); None when off
    probes: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MethodOutcome:
        return cls(**{f.name: d.get(f.name, f.default) for f in fields(cls)})


@dataclass
class RunRecord:
    """What a pytest session produced. `public()` is what reports read (kl_report.json); `to_dict()` adds what
    the controller needs to update baselines (the staged entries, spec, identity and floor) and is what an xdist
    worker sends. Checks are gate.Check dicts with method, length and kind; findings are Finding dicts."""

    run: dict[str, Any]
    methods: dict[str, MethodOutcome] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    growth: dict[str, dict[str, Any]] = field(default_factory=dict)
    baselines: dict[str, Any] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)
    baseline_changes: list[str] = field(default_factory=list)
    entries: dict[str, Any] = field(default_factory=dict)
    staged_findings: dict[str, str] = field(default_factory=dict)
    spec: dict[str, Any] | None = None
    identity: dict[str, Any] | None = None
    floor: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = {m: o.to_dict() for m, o in self.methods.items()}
        d["schema"] = RECORD_SCHEMA
        return d

    def write(self, report_dir: str | Path) -> Path:
        """The full record as RECORD_FILE in `report_dir` (atomic)."""
        from lcc_harness.files import write_json

        return write_json(Path(report_dir) / RECORD_FILE, self.to_dict(), indent=None, sort_keys=False)

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in _STAGED}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunRecord:
        if d.get("schema") != RECORD_SCHEMA:
            raise ValueError(f"run record of schema {d.get('schema')!r}, expected {RECORD_SCHEMA}")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["methods"] = {m: MethodOutcome.from_dict(o) for m, o in (d.get("methods") or {}).items()}
        return cls(**kw)

    def add_unfinished(self, unfinished: Mapping[str, str]) -> None:
        """Methods whose computing process died (share.RunStore.unfinished): an error outcome naming it."""
        for mid, who in unfinished.items():
            if mid not in self.methods:
                self.methods[mid] = MethodOutcome("error", died_message(mid, who))

    @classmethod
    def merge(cls, parts: Sequence[RunRecord]) -> RunRecord:
        """One record from the controller's and the workers' parts: run metadata from the first part that knows
        the model's identity, mappings united, lists concatenated."""
        first = next((p for p in parts if p.identity), parts[0])
        out = cls(run=dict(first.run), spec=first.spec, identity=first.identity)
        for p in parts:
            for name in ("methods", "growth", "baselines", "entries", "staged_findings"):
                getattr(out, name).update(getattr(p, name))
            for name in ("checks", "findings", "baseline_changes"):
                getattr(out, name).extend(getattr(p, name))
        out.floor = next((p.floor for p in parts if p.floor), None)
        return out
