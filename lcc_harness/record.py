"""The run record: what a pytest session produces (run metadata, per-method outcomes and curves, checks, growth,
baselines, findings) as the JSON-ready mapping the plugin assembles and the reports read. These accessors are the
one place that knows its layout (typed dataclasses for it are the next step, see the open structure issue)."""

from __future__ import annotations

import math
from collections.abc import Mapping
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
