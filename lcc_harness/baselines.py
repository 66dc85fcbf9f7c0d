"""Stored KL baselines: load, compare (one-sided), update atomically under a lock.

One JSON file per (model, dtype, device type, profile), human-diffable: sorted keys, values rounded to 5
significant digits, no timestamps unless an entry changes.

Tolerance rule (stored with each entry, derived from measured spread):
  tol = 2 · SE + 2 · noise · value
SE is the standard error over evaluation samples (per-sample window KL for a length; bootstrap SE for the growth
ratio); noise is the relative float noise measured when the baseline was written (the same statistic computed by
a separate pass at the shortest length vs. the one-pass run). A run fails when value > baseline + tol; it is
reported "better" when value < baseline − tol.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BaselineError

SCHEMA = "lcc-baseline/1"
SE_FACTOR = 2.0
NOISE_FACTOR = 2.0
IDENTITY_KEYS = ("model", "dtype", "device_type", "profile")
SPEC_KEYS = ("lengths", "samples", "seed", "corpus_sha256", "samples_sha256")


def round_sig(x: float, sig: int = 5) -> float:
    if x is None or not math.isfinite(x) or x == 0:
        return x
    return round(x, sig - 1 - int(math.floor(math.log10(abs(x)))))


def _round_tree(obj: Any) -> Any:
    if isinstance(obj, float):
        return round_sig(obj)
    if isinstance(obj, dict):
        return {k: _round_tree(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_round_tree(v) for v in obj]
    return obj


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def baseline_path(root: Path, model: str, dtype: str, device_type: str, profile: str) -> Path:
    return (
        Path(root)
        / f"{slug(Path(model).name if os.sep in model else model)}.{dtype}.{device_type}.{profile}.json"
    )


def tolerance(value: float, se: float, noise: float) -> float:
    return SE_FACTOR * se + NOISE_FACTOR * noise * abs(value) + 1e-9


@dataclass(frozen=True)
class Check:
    """Outcome of one one-sided comparison."""

    outcome: str  # pass | fail | better | missing
    value: float
    baseline: float | None
    tolerance: float | None

    @property
    def message(self) -> str:
        if self.baseline is None:
            return f"{self.value:.5g} (no baseline)"
        rel = (self.value / self.baseline - 1) if self.baseline else float("inf")
        return (
            f"{self.value:.5g} vs baseline {self.baseline:.5g} ({rel:+.1%}; tolerance +{self.tolerance:.3g}"
            f" → limit {self.baseline + self.tolerance:.5g})"
        )


def compare(value: float, baseline: float | None, tol: float | None) -> Check:
    """One-sided: fail only when worse beyond tolerance; NaN/Inf always fail."""
    if baseline is None or tol is None:
        return Check("missing", value, None, None)
    if not math.isfinite(value) or not value <= baseline + tol:
        return Check("fail", value, baseline, tol)
    if value < baseline - tol:
        return Check("better", value, baseline, tol)
    return Check("pass", value, baseline, tol)


class BaselineFile:
    """A baseline file's content; `load` validates it against the identity of the current run."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = Path(path)
        self.data = data

    @property
    def methods(self) -> dict[str, Any]:
        return self.data.setdefault("methods", {})

    @property
    def findings(self) -> dict[str, str]:
        return self.data.setdefault("findings", {})

    @classmethod
    def load(cls, path: Path, identity: Mapping[str, Any], spec: Mapping[str, Any]) -> BaselineFile | None:
        """None when the file does not exist; BaselineError when it is corrupt, foreign or of other samples."""
        path = Path(path)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BaselineError(
                f"baseline file '{path}' is not valid JSON ({exc}); restore it from git "
                "(`git checkout -- <file>`) or delete it and re-create with --lcc-update-baselines"
            ) from None
        problem = _schema_problem(data)
        if problem:
            raise BaselineError(
                f"baseline file '{path}' does not follow schema {SCHEMA} ({problem}); restore it "
                "from git or re-create it with --lcc-update-baselines"
            )
        for k in IDENTITY_KEYS:
            if data.get(k) != identity.get(k):
                raise BaselineError(
                    f"baseline file '{path}' is for {k}={data.get(k)!r} but this run has "
                    f"{identity.get(k)!r}; use the matching file or re-create it with "
                    "--lcc-update-baselines"
                )
        stored = data.get("spec", {})
        diff = [k for k in SPEC_KEYS if stored.get(k) != spec.get(k)]
        if diff:
            raise BaselineError(
                f"baseline file '{path}' was measured with other {', '.join(diff)} "
                f"({', '.join(f'{k}={stored.get(k)!r}' for k in diff)}); run with the same "
                "options or re-create it with --lcc-update-baselines"
            )
        return cls(path, data)

    def kl_entry(self, method: str, length: int) -> tuple[float, float] | None:
        c = self.methods.get(method, {}).get("curves", {}).get(str(length))
        return (c["window_kl"], c["tolerance"]) if c else None

    def growth_entry(self, method: str) -> tuple[float, float] | None:
        g = self.methods.get(method, {}).get("growth")
        return (g["ratio"], g["tolerance"]) if g else None


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _schema_problem(data: Any) -> str | None:
    """What is wrong with a parsed baseline file's structure, or None when it is usable."""
    if not isinstance(data, dict):
        return f"top level is a {type(data).__name__}, not an object"
    if data.get("schema") != SCHEMA:
        return f"schema is {data.get('schema')!r}"
    if not isinstance(data.get("methods"), dict):
        return "'methods' is not an object"
    if not isinstance(data.get("findings", {}), dict):
        return "'findings' is not an object"
    for mid, entry in data["methods"].items():
        curves = entry.get("curves") if isinstance(entry, dict) else None
        growth = entry.get("growth") if isinstance(entry, dict) else None
        if not isinstance(curves, dict) or not isinstance(growth, dict):
            return f"method {mid!r} lacks 'curves' or 'growth'"
        for L, c in curves.items():
            if not (isinstance(c, dict) and _number(c.get("window_kl")) and _number(c.get("tolerance"))):
                return f"method {mid!r} length {L} lacks a numeric window_kl/tolerance"
        if not (_number(growth.get("ratio")) and _number(growth.get("tolerance"))):
            return f"method {mid!r} growth lacks a numeric ratio/tolerance"
    return None


def method_entry(
    curves: Mapping[str, Mapping[str, Any]],
    growth: Mapping[str, Any],
    noise: float,
    method_info: Mapping[str, Any],
) -> dict[str, Any]:
    """The stored form of one method: per-length window KL with SE and tolerance, and growth."""
    import numpy as np

    out_curves = {}
    for L, c in curves.items():
        per = np.asarray(c["per_sample"]["window_kl"], dtype=np.float64)
        se = float(per.std(ddof=1) / math.sqrt(len(per))) if len(per) > 1 else 0.0
        out_curves[str(L)] = {
            "window_kl": c["window_kl"],
            "cumulative_kl": c["cumulative_kl"],
            "se": se,
            "tolerance": tolerance(c["window_kl"], se, noise),
        }
    g = dict(growth)
    g["tolerance"] = tolerance(g["ratio"], g["ratio_se"], noise)
    info = {k: v for k, v in method_info.items() if isinstance(v, int | float | str | bool)}
    return _round_tree({"curves": out_curves, "growth": g, "float_noise": noise, "method_info": info})


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `.<name>.lock` beside `path` for read-merge-write cycles across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def update(
    path: Path,
    identity: Mapping[str, Any],
    spec: Mapping[str, Any],
    meta: Mapping[str, Any],
    entries: Mapping[str, dict[str, Any]],
    findings: Mapping[str, str],
) -> list[str]:
    """Merge `entries` (method id → method_entry) and `findings` into the file; returns what changed.

    Entries of methods that did not run are kept, unless the spec changed (then they are dropped, since they
    were measured on other samples). Written atomically under a lock.
    """
    with locked(path):
        _remove_stale_temps(path)
        changes: list[str] = []
        data: dict[str, Any] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                changes.append(f"{path.name}: unreadable old file replaced")
                data = {}
        if data and _schema_problem(data):
            changes.append(f"{path.name}: old file of another schema replaced ({_schema_problem(data)})")
            data = {}
        same = all(data.get(k) == identity.get(k) for k in IDENTITY_KEYS) and all(
            data.get("spec", {}).get(k) == spec.get(k) for k in SPEC_KEYS
        )
        if data and not same:
            dropped = sorted(set(data.get("methods", {})) - set(entries))
            changes.append(
                f"{path.name}: run spec changed; dropped {len(dropped)} stale entr(y/ies) {dropped}"
            )
            data = {}
        methods = dict(data.get("methods", {}))
        for mid, entry in entries.items():
            old = methods.get(mid)
            if old is None:
                changes.append(f"{mid}: added")
            else:
                changes.extend(_diff(mid, old, entry))
            methods[mid] = entry
        stored_findings = dict(data.get("findings", {}))
        for claim, holds in findings.items():
            if stored_findings.get(claim) != holds:
                changes.append(f"finding {claim}: {stored_findings.get(claim)} → {holds}")
            stored_findings[claim] = holds
        new = {
            "schema": SCHEMA,
            **{k: identity[k] for k in IDENTITY_KEYS},
            "spec": dict(spec),
            "meta": dict(meta) if (changes or not data) else data.get("meta", dict(meta)),
            "methods": methods,
            "findings": stored_findings,
        }
        if new != data:
            write_json_atomic(path, new)
        return changes


def _diff(mid: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out = []
    for L, c in new.get("curves", {}).items():
        o = old.get("curves", {}).get(L, {}).get("window_kl")
        if o != c["window_kl"]:
            out.append(f"{mid}@{L} window_kl {o} → {c['window_kl']}")
    og, ng = old.get("growth", {}), new.get("growth", {})
    if og.get("ratio") != ng.get("ratio") or og.get("verdict") != ng.get("verdict"):
        out.append(
            f"{mid} growth {og.get('ratio')} ({og.get('verdict')}) → {ng.get('ratio')} ({ng.get('verdict')})"
        )
    return out


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files a killed writer of `path` left behind (call under `locked(path)`)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON (sorted keys, indent 1) so that `path` is always either the old file or the complete new one.

    The text goes to a temp file in the same folder, is fsynced, then renamed over `path`. For fault-injection
    tests, LCC_TEST_SLOW_WRITE=<seconds> pauses halfway through the temp file and again before the rename.
    """
    path = Path(path)
    text = json.dumps(obj, indent=1, sort_keys=True) + "\n"
    try:
        pause = max(float(os.environ.get("LCC_TEST_SLOW_WRITE") or 0), 0.0)
    except ValueError:
        pause = 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            half = len(text) // 2 if pause else len(text)
            f.write(text[:half])
            if pause:
                f.flush()
                time.sleep(pause)
            f.write(text[half:])
            f.flush()
            os.fsync(f.fileno())
        if pause:
            time.sleep(pause)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
