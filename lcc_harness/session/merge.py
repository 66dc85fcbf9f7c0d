"""`lcc merge`: the records of a sharded run (`pytest suites/ --lcc-shard I/N`, one per CI machine) joined into one
report, the paper's claims evaluated on every method at once, and at most one atomic baseline update.

Every pytest session writes its full record, `lcc-record.json`, beside its report (the report's JSON is the public
part; the full record adds the staged baseline entries, the spec, the model identity and the floor). Records of
different spec (model, dtype, device type, profile, lengths, samples, corpus, seed) are refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lcc_harness.errors import HarnessError
from lcc_harness.record import RECORD_FILE, RunRecord


def load_records(paths: Sequence[str | Path]) -> list[RunRecord]:
    out = []
    given: dict[Path, str] = {}  # resolved file -> the argument that named it
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            p = p / RECORD_FILE
        if (key := p.resolve()) in given:
            raise HarnessError(
                f"run record {p} is given twice (as {given[key]} and {arg}); pass each shard's record once"
            )
        given[key] = str(arg)
        try:
            out.append(RunRecord.from_dict(json.loads(p.read_text())))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise HarnessError(
                f"cannot read run record {p}: {exc}; pass the {RECORD_FILE} of each shard"
            ) from None
    if not out:
        raise HarnessError(f"no run records given; pass each shard's {RECORD_FILE}")
    return out


def check_compatible(records: Sequence[RunRecord], paths: Sequence[str | Path]) -> None:
    """HarnessError naming the first record whose identity or spec differs from the first one's."""
    first = records[0]
    if first.identity is None or first.spec is None:
        raise HarnessError(f"run record {paths[0]} measured nothing (no model identity); nothing to merge")
    for rec, path in zip(records[1:], paths[1:], strict=True):
        for what, a, b in (("identity", first.identity, rec.identity), ("spec", first.spec, rec.spec)):
            if b is None:
                raise HarnessError(f"run record {path} measured nothing (no {what}); leave it out")
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if diff:
                k = diff[0]
                raise HarnessError(
                    f"run records of different {what}: {paths[0]} has {k}={a.get(k)!r}, {path} has "
                    f"{k}={b.get(k)!r}; merge only shards of one run"
                )
    seen: dict[str, Any] = {}
    for rec, path in zip(records, paths, strict=True):
        for m in rec.methods:
            if m in seen:
                raise HarnessError(
                    f"method '{m}' is in two records ({seen[m]}, {path}); shards must not overlap"
                )
            seen[m] = path


def claims(rec: RunRecord) -> tuple[list[dict[str, Any]], list[str]]:
    """Every claim of the record's profile whose methods all have complete matched-target curves: Finding dicts;
    and a line for each claim left out."""
    from lcc_harness.profiles import get_profile
    from lcc_harness.verdicts.claims import CLAIMS, claim_methods, evaluate_claim, missing_roles

    roles = get_profile(rec.identity["profile"]).roles
    lengths = [int(L) for L in rec.spec["lengths"]]
    out, skipped = [], []
    for name in CLAIMS:
        if missing_roles(name, roles):  # a claim for other models (sliding-window layers): not this profile's
            continue
        needed = claim_methods(name, roles)
        if CLAIMS[name].data == "copy-ratio":
            got = _copy_claim(name, roles, needed, rec, lengths)
            if got is None:
                skipped.append(f"claim {name}: not evaluated (needs the copy probe of {', '.join(needed)})")
            else:
                out.append(got)
            continue
        curves = {}
        for m in needed:
            o = rec.methods.get(m)
            matched = None if o is None or o.status != "ok" else (o.matched or {}).get("curves")
            per = None if matched is None else _per_sample(matched, lengths)
            if per is None:
                break
            curves[m] = per
        if len(curves) < len(needed) or len(lengths) < 2:
            skipped.append(
                f"claim {name}: not evaluated (needs complete matched-target curves of {', '.join(needed)})"
            )
            continue
        out.append(evaluate_claim(name, roles, curves, lengths, rec.run.get("target_tokens")))
    return out, skipped


def _copy_claim(name: str, roles: Any, needed: list[str], rec: RunRecord, lengths: list[int]) -> dict | None:
    """The copy-probe claim from the record's methods (findings.copy_ratio), or None when one lacks the probe."""
    from lcc_harness.verdicts.claims import copy_ratio, evaluate_claim

    curves = {}
    for m in needed:
        o = rec.methods.get(m)
        if o is None or o.status != "ok" or not o.probes or not o.curves:
            return None
        window = {int(L): c["per_sample"]["window_kl"] for L, c in o.curves.items()}
        curves[m] = copy_ratio(o.probes, window, lengths)
    return evaluate_claim(name, roles, curves, lengths)


def _per_sample(curves: dict[str, Any], lengths: list[int]) -> dict[int, list[float]] | None:
    try:
        return {L: list(curves[str(L)]["per_sample"]["window_kl"]) for L in lengths}
    except (KeyError, TypeError):
        return None


def merge(
    paths: Sequence[str | Path],
    report_dir: str | Path,
    baseline_dir: str | Path,
    update: bool = False,
) -> tuple[RunRecord, int]:
    """Join the records, evaluate the claims, write the reports (and with `update` the baselines); returns the
    merged record and the exit status: 1 when a record has a failed check or a claim's verdict changed."""
    from lcc_harness.gate.baselines import (
        BaselineError,
        BaselineFile,
        findings_basis,
        identity_path,
        update_from_record,
    )
    from lcc_harness.gate.check import check_claim
    from lcc_harness.report import append_step_summary, check_writable, write_reports

    records = load_records(paths)
    check_compatible(records, paths)
    check_writable(Path(report_dir))
    rec = RunRecord.merge(records)
    rec.findings, skipped = claims(rec)
    ident = rec.identity
    path = identity_path(Path(baseline_dir), ident)
    status = 1 if any(c.get("outcome") in ("fail", "error", "missing") for c in rec.checks) else 0
    if update:
        rec.staged_findings = {f["claim"]: f["holds"] for f in rec.findings}
        update_from_record(Path(baseline_dir), rec)
    else:
        try:
            stored = BaselineFile.load(path, ident, rec.spec) if path.exists() else None
        except BaselineError as exc:
            raise HarnessError(str(exc)) from None
        basis = findings_basis(rec.run.get("target_tokens"))
        checks = [check_claim(f, stored, basis) for f in rec.findings]
        then = next((c.then for c in checks if c.outcome == "basis"), None)
        if then is not None:
            status = 1
            rec.baseline_changes.append(
                f"claims: the stored verdicts were judged on {then}, these records on {basis}; not compared"
            )
        for f, c in zip(rec.findings, checks, strict=True):
            if c.outcome == "changed":
                status = 1
                rec.baseline_changes.append(
                    f"claim {f['claim']}: verdict changed from '{c.stored}' to '{f['holds']}'"
                )
    rec.baseline_changes.extend(skipped)
    rec.run["merged_from"] = [str(p) for p in paths]
    write_reports(rec.public(), report_dir)
    rec.write(report_dir)
    append_step_summary(rec.public())
    return rec, status
