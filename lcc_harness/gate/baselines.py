"""Stored KL baselines: load and validate, the stored form of a method, update atomically under a lock.

One JSON file per (model, dtype, device type, profile), human-diffable: sorted keys, no timestamps unless an
entry changes. Per method and length it stores the window KL of every evaluation sample at full precision
(Python's shortest round-trip repr), so rounding can never decide a check; display values (cumulative KL,
growth statistics, method info) are rounded to 5 significant digits. NaN and Infinity are refused on write,
and every number the gate reads is validated on load (finite, ≥ 0, one value per sample). The comparison
rule lives in `gate.py`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lcc_harness.errors import BaselineError
from lcc_harness.files import write_json
from lcc_harness.options import GATED_PROBES  # the probes whose KL the gate checks (probes.py)

SCHEMA = "lcc-baseline/3"  # 3: claims judged on matched-target curves, findings_basis
# engine: absent for torch (every file before the llama.cpp engine), "llama.cpp" for that engine's baselines
IDENTITY_KEYS = ("model", "dtype", "device_type", "profile", "engine")
SPEC_KEYS = ("lengths", "samples", "seed", "corpus_sha256", "samples_sha256")
MAX_REL_NOISE = (
    0.1  # a stored float noise above 10 % of the value is not float noise: it would blunt the gate
)
MAX_FLOOR = 0.01  # nats; a larger floor would hide real regressions of good quantizers
NEG_SLACK = 1e-6  # KL is ≥ 0; float rounding may leave a stored mean this far below zero


def findings_basis(target_tokens: int | None) -> dict[str, Any]:
    """What stored claim verdicts were judged on: the matched-target curves of `target_tokens` target tokens."""
    return {"curves": "matched", "target_tokens": target_tokens}


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


def baseline_path(
    root: Path, model: str, dtype: str, device_type: str, profile: str, engine: str = "torch"
) -> Path:
    """<model>.<dtype>.<device>.<profile>.json for the torch engine; <model>.<dtype>.<device>.llama.cpp.<profile>.json
    for llama.cpp (a torch baseline never gates a llama.cpp run, and the reverse)."""
    where = device_type if engine == "torch" else f"{device_type}.{engine}"
    return (
        Path(root) / f"{slug(Path(model).name if os.sep in model else model)}.{dtype}.{where}.{profile}.json"
    )


def identity_path(root: Path, ident: Mapping[str, Any]) -> Path:
    """The baseline file of a run identity (session.identity(): model, dtype, device_type, profile, engine)."""
    return baseline_path(
        root,
        ident["model"],
        ident["dtype"],
        ident["device_type"],
        ident["profile"],
        ident.get("engine") or "torch",
    )


class BaselineFile:
    """A baseline file's content; `load` validates it against the identity and sample spec of the current run."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = Path(path)
        self.data = data

    @property
    def methods(self) -> dict[str, Any]:
        return self.data.setdefault("methods", {})

    @property
    def findings(self) -> dict[str, str]:
        return self.data.setdefault("findings", {})

    @property
    def findings_basis(self) -> dict[str, Any] | None:
        """The curves the stored verdicts were judged on ({'curves': 'matched', 'target_tokens': T}), or None."""
        return self.data.get("findings_basis")

    @property
    def floor(self) -> float:
        """Absolute KL floor of this baseline (nats), see gate.floor_from_self_noise."""
        return float(self.data["floor"]["kl"])

    @classmethod
    def load(cls, path: Path, identity: Mapping[str, Any], spec: Mapping[str, Any]) -> BaselineFile | None:
        """None when the file does not exist; BaselineError when it is corrupt, foreign or of other samples."""
        path = Path(path)
        if not path.exists():
            return None
        if path.is_dir():
            raise BaselineError(
                f"baseline path '{path}' is a directory; remove it or pass another --lcc-baseline-dir"
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BaselineError(
                f"baseline file '{path}' is not valid JSON ({exc}); restore it from git "
                "(`git checkout -- <file>`) or delete it and re-create with --lcc-update-baselines"
            ) from None
        problem = schema_problem(data)
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

    def per_sample(self, method: str, length: int) -> list[float] | None:
        """Stored per-sample window KL of `method` at `length`, or None when there is none."""
        c = self.methods.get(method, {}).get("curves", {}).get(str(length))
        return [float(x) for x in c["per_sample"]] if c else None

    def probe_values(self, method: str, probe: str, length: int) -> tuple[bool, list[float] | None]:
        """(stored?, values) of a gated probe at `length`: (False, None) when the baseline has no such entry,
        (True, None) when it is stored as n/a, else (True, the per-sample values — one pooled value for keytokens)."""
        cells = (self.methods.get(method, {}).get("probes") or {}).get(probe)
        if not isinstance(cells, dict) or str(length) not in cells:
            return False, None
        c = cells[str(length)]
        return True, None if c is None else [float(x) for x in c["per_sample"]]

    def rel_noise(self, method: str) -> float:
        return float(self.methods[method]["float_noise"]["relative"])


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _kl_problem(x: Any, where: str) -> str | None:
    if not _number(x):
        return f"{where} is {x!r}, not a number"
    if not math.isfinite(x):
        return f"{where} is {x}; KL values must be finite"
    if x < -NEG_SLACK:
        return f"{where} is {x}; KL values are ≥ 0"
    return None


def schema_problem(data: Any) -> str | None:
    """What is wrong with a parsed baseline file (structure and every number the gate reads), or None.
    The answer names the key, e.g. "methods.rtn-w3-g64.curves.256.per_sample[2] is inf; …"."""
    if not isinstance(data, dict):
        return f"top level is a {type(data).__name__}, not an object"
    if data.get("schema") != SCHEMA:
        return f"schema is {data.get('schema')!r}"
    if not isinstance(data.get("methods"), dict):
        return "'methods' is not an object"
    if not isinstance(data.get("findings", {}), dict):
        return "'findings' is not an object"
    if not isinstance(data.get("findings_basis", {}), dict):
        return "'findings_basis' is not an object"
    spec = data.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("samples"), int) or spec["samples"] < 1:
        return "'spec.samples' is not a positive integer"
    n = spec["samples"]
    floor = data.get("floor", {}).get("kl") if isinstance(data.get("floor"), dict) else None
    if not (_number(floor) and math.isfinite(floor) and 0 < floor <= MAX_FLOOR):
        return f"floor.kl is {floor!r}; it must be a number in (0, {MAX_FLOOR}] nats"
    for mid, entry in data["methods"].items():
        at = f"methods.{mid}"
        if not isinstance(entry, dict) or not isinstance(entry.get("curves"), dict):
            return f"{at} lacks 'curves'"
        noise = entry.get("float_noise")
        if not isinstance(noise, dict):
            return f"{at}.float_noise is missing"
        for k in ("absolute", "relative"):
            v = noise.get(k)
            if not (_number(v) and math.isfinite(v) and v >= 0):
                return f"{at}.float_noise.{k} is {v!r}; it must be a finite number ≥ 0"
        if noise["relative"] > MAX_REL_NOISE:
            return f"{at}.float_noise.relative is {noise['relative']}; above {MAX_REL_NOISE} it is not float noise"
        for L, c in entry["curves"].items():
            where = f"{at}.curves.{L}"
            if not (isinstance(L, str) and L.isdigit()):
                return f"{where}: length key {L!r} is not an integer"
            if not isinstance(c, dict):
                return f"{where} is not an object"
            per = c.get("per_sample")
            if not isinstance(per, list) or len(per) != n:
                got = len(per) if isinstance(per, list) else repr(per)
                return f"{where}.per_sample has {got} values, not one per sample ({n})"
            p = _mean_problem(per, c, "window_kl", where)
            if p:
                return p
        p = _probes_problem(entry.get("probes"), f"{at}.probes")
        if p:
            return p
    return None


def _probes_problem(probes: Any, at: str) -> str | None:
    """What is wrong with a method's stored probes (absent is fine: a baseline written without probes)."""
    if probes is None:
        return None
    if not isinstance(probes, dict):
        return f"{at} is not an object"
    for name, cells in probes.items():
        if name not in GATED_PROBES or not isinstance(cells, dict):
            return f"{at}.{name} is not one of {', '.join(GATED_PROBES)} with an object of lengths"
        for L, c in cells.items():
            where = f"{at}.{name}.{L}"
            if not (isinstance(L, str) and L.isdigit()):
                return f"{where}: length key {L!r} is not an integer"
            if c is None:  # n/a at this length
                continue
            if not isinstance(c, dict) or not isinstance(c.get("per_sample"), list) or not c["per_sample"]:
                return f"{where} lacks per_sample values"
            p = _mean_problem(c["per_sample"], c, "kl", where)
            if p:
                return p
    return None


def _mean_problem(per: list[Any], cell: Mapping[str, Any], key: str, where: str) -> str | None:
    """What is wrong with per-sample KL values and their stored mean cell[key], or None."""
    for i, x in enumerate(per):
        p = _kl_problem(x, f"{where}.per_sample[{i}]")
        if p:
            return p
    p = _kl_problem(cell.get(key), f"{where}.{key}")
    if p:
        return p
    mean = math.fsum(per) / len(per)
    if abs(cell[key] - mean) > 1e-9 * max(abs(mean), 1e-12) + 1e-15:
        return f"{where}.{key} {cell[key]} is not the mean of per_sample ({mean}); edit both"
    return None


def probe_entry(probes: Mapping[str, Any]) -> dict[str, Any]:
    """The stored form of a method's gated probes (probes.summarize_probes → per gated probe, per length): the
    KL values the gate compares (full precision) — key-token KL pooled over samples ('per_sample' holds that one
    value: key tokens differ in number between samples), copy KL per sample — or null where the probe is n/a."""
    out: dict[str, Any] = {}
    for name in GATED_PROBES:
        if name not in (probes.get("config") or {}).get("names", []):
            continue
        cells = {}
        for L, c in (probes.get("curves") or {}).items():
            cell = c.get(name) or {}
            kl = cell.get("kl")
            per = [kl] if name == "keytokens" else cell.get("per_sample")
            cells[str(L)] = {"kl": kl, "per_sample": per} if kl is not None and per else None
        out[name] = cells
    return out


def method_entry(
    curves: Mapping[str, Mapping[str, Any]],
    growth: Mapping[str, Any],
    noise: Mapping[str, float],
    method_info: Mapping[str, Any],
    probes: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The stored form of one method: per length the window KL of each sample (full precision) and their mean;
    growth statistics, the float noise and method facts rounded for display; the gated probes (`probe_entry`)
    when the run measured them."""
    out_curves = {}
    for L, c in curves.items():
        per = [float(x) for x in c["per_sample"]["window_kl"]]
        out_curves[str(L)] = {
            "window_kl": math.fsum(per) / len(per),
            "per_sample": per,
            "cumulative_kl": round_sig(c["cumulative_kl"]),
        }
    info = {k: v for k, v in method_info.items() if isinstance(v, int | float | str | bool)}
    return {
        "curves": out_curves,
        "growth": _round_tree(dict(growth)),
        "float_noise": _round_tree({k: float(noise.get(k, 0.0)) for k in ("absolute", "relative")}),
        "method_info": _round_tree(info),
        **({"probes": probe_entry(probes)} if probes else {}),
    }


def _nonfinite_key(obj: Any, at: str = "") -> str | None:
    """The dotted key of the first NaN/Infinity in `obj`, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return at or "(top level)"
    if isinstance(obj, dict):
        for k, v in obj.items():
            hit = _nonfinite_key(v, f"{at}.{k}" if at else str(k))
            if hit:
                return hit
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            hit = _nonfinite_key(v, f"{at}[{i}]")
            if hit:
                return hit
    return None


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
    floor: Mapping[str, float] | None = None,
    findings_basis: Mapping[str, Any] | None = None,
) -> list[str]:
    """Merge `entries` (method id → method_entry) and `findings` into the file; returns what changed.

    Entries of methods that did not run are kept. When the spec changed, the file is replaced only if this update
    re-measures every method in it; otherwise BaselineError (nothing is dropped). Written atomically under a lock.
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
        if data and schema_problem(data):
            changes.append(f"{path.name}: old file of another schema replaced ({schema_problem(data)})")
            data = {}
        same = all(data.get(k) == identity.get(k) for k in IDENTITY_KEYS) and all(
            data.get("spec", {}).get(k) == spec.get(k) for k in SPEC_KEYS
        )
        if data and not same:
            others = sorted(set(data.get("methods", {})) - set(entries))
            if others:  # never drop what this run did not re-measure
                diff = [k for k in SPEC_KEYS if data.get("spec", {}).get(k) != spec.get(k)]
                diff += [k for k in IDENTITY_KEYS if data.get(k) != identity.get(k)]
                raise BaselineError(
                    f"baseline file '{path}' was measured with other {', '.join(diff)}; updating only "
                    f"{sorted(entries)} would drop {len(others)} other method(s) {others[:5]}; update them all in "
                    "one run, pass another --lcc-baseline-dir, or delete the file to start over"
                )
            changes.append(f"{path.name}: run spec changed; all {len(entries)} entries re-measured")
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
            **{k: identity[k] for k in IDENTITY_KEYS if identity.get(k) is not None},
            "spec": dict(spec),
            "meta": dict(meta) if (changes or not data) else data.get("meta", dict(meta)),
            "floor": dict(floor) if floor else data.get("floor"),
            "methods": methods,
            "findings": stored_findings,
        }
        basis = dict(findings_basis) if (findings and findings_basis) else data.get("findings_basis")
        if basis is not None:
            if data.get("findings_basis") not in (None, basis):
                changes.append(f"findings basis {data.get('findings_basis')} → {basis}")
            new["findings_basis"] = basis
        if new.get("floor") and data.get("floor") and new["floor"] != data["floor"]:
            changes.append(f"floor {data['floor'].get('kl')} → {new['floor'].get('kl')}")
        problem = schema_problem(new)
        if problem:
            raise BaselineError(f"refusing to write baseline '{path}': {problem}")
        if new != data:
            write_json_atomic(path, new)
        return changes


def _diff(mid: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out = []
    for L, c in new.get("curves", {}).items():
        o = old.get("curves", {}).get(L, {}).get("window_kl")
        if o != c["window_kl"]:
            out.append(f"{mid}@{L} window_kl {o} → {c['window_kl']}")
    for L in sorted(set(old.get("curves", {})) - set(new.get("curves", {}))):
        out.append(f"{mid}@{L} dropped")
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
    """A baseline file written (files.write_json: sorted keys, indent 1, atomic); NaN/Infinity are refused with a
    BaselineError naming the key (a tolerance cannot rest on them)."""
    path = Path(path)
    bad = _nonfinite_key(obj)
    if bad:
        raise BaselineError(f"refusing to write '{path}': {bad} is NaN or Infinity, which JSON cannot hold")
    write_json(path, obj)


def update_from_record(baseline_dir: Path, rec: Any) -> None:
    """The record's staged entries and verdicts into its baseline file under `baseline_dir` (baselines.update:
    atomic, locked, other methods kept); what changed is appended to rec.baseline_changes."""
    from lcc_harness import __version__

    if not rec.entries and not rec.staged_findings:
        return
    ident, spec = rec.identity, rec.spec
    path = identity_path(baseline_dir, ident)
    meta = {"versions": rec.run["versions"], "harness": __version__, "updated": rec.run["finished"][:10]}
    basis = None
    if rec.staged_findings and rec.run.get("target_tokens") is not None:
        basis = findings_basis(int(rec.run["target_tokens"]))
    changes = update(path, ident, spec, meta, rec.entries, rec.staged_findings, rec.floor, basis)
    rec.baseline_changes.extend(changes or [f"{path.name}: no change"])
