"""The cases: each pytest case's check against the stored baseline (window KL, growth, probes) and each claim's verdict, recorded for the report"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest


class Cases:
    """LccSession's the cases (a part of LccSession; it reads the harness's state)."""

    def _stage_entry(self, method_id: str) -> None:
        from lcc_harness.gate.baselines import method_entry

        res = self.complete_result(method_id, "a baseline entry")
        curves = {str(L): res.stats[L].to_dict() for L in self.lengths}
        info = dict(res.info.get("method_info", {}))
        noise = info.pop("float_noise", None) or {"absolute": 0.0, "relative": 0.0}
        self.entries[method_id] = method_entry(curves, self.growth_of(method_id), noise, info, res.probes)

    def _record_check(self, method_id: str, length: int | None, kind: str, chk) -> None:
        self.checks.append({"method": method_id, "length": length, "kind": kind, **chk.to_dict()})

    def _record_plain(self, method_id: str, length: int | None, kind: str, outcome: str, value=None) -> None:
        from lcc_harness.gate.check import Check

        self._record_check(method_id, length, kind, Check(outcome, value, None, None))

    @contextlib.contextmanager
    def properties(self, record_property: Callable[[str, object], None]) -> Iterator[None]:
        """What the case inside the block checked, as junit properties (pytest's `record_property`), also when it
        fails: per check its method, length, kind, value (as `kl` or `growth`), baseline, tolerance and outcome;
        per claim its verdict and the stored one (a value that is None is left out)."""
        n_checks, n_findings = len(self.checks), len(self.findings)
        try:
            yield
        finally:
            for c in self.checks[n_checks:]:
                value_key = "growth" if c.get("kind") == "growth" else "kl"
                for key, value in (
                    ("method", c.get("method")),
                    ("length", c.get("length")),
                    ("kind", c.get("kind")),
                    (value_key, c.get("value")),
                    ("baseline", c.get("baseline")),
                    ("tolerance", c.get("tolerance")),
                    ("outcome", c.get("outcome")),
                ):
                    if value is not None:
                        record_property(key, value)
            for f in self.findings[n_findings:]:
                for key in ("claim", "holds", "stored"):
                    if f.get(key) is not None:
                        record_property(key, f.get(key))

    # ---- checks used by the suites ------------------------------------------------------------
    def check_kl(self, method_id: str, length: int) -> None:
        """Fail when the mean window KL at `length` exceeds the baseline's by more than the tolerance."""
        self._check("kl", method_id, length)

    def check_growth(self, method_id: str) -> None:
        """Fail when growth (mean window KL at the longest ÷ the shortest length) exceeds the baseline's beyond
        its tolerance; n/a (passes) when either run has KL ~0 at the shortest length."""
        self._check("growth", method_id, None)

    def check_probe(self, method_id: str, length: int, probe: str) -> None:
        """Fail when a gated probe's KL at `length` (baselines.GATED_PROBES: key-token KL pooled over samples, copy
        KL per sample) exceeds the baseline's by more than the tolerance — the window-KL rule (gate.check_kl) with
        the method's stored float noise. Skips when this run does not measure the probe; n/a (passes, recorded)
        where the probe is n/a in this run or the baseline (no key token in the window, the reference fails to
        copy)."""
        from lcc_harness.gate.check import check_kl

        self._require_window("the probes")
        res = self.result(method_id)
        if res.probes is None or probe not in res.probes["config"]["names"]:
            pytest.skip(f"this run does not measure the {probe} probe (--lcc-probes)")
        kind = f"probe:{probe}"
        if length in res.errors or str(length) not in res.probes["curves"]:
            self._record_plain(method_id, length, kind, "error")
            pytest.fail(res.errors.get(length, f"{method_id}: no {probe} probe at {length}"), pytrace=False)
        cell = res.probes["curves"][str(length)].get(probe) or {}
        value = cell.get("kl")
        new = [value] if probe == "keytokens" else cell.get("per_sample")
        if self.update:
            self._stage_entry(method_id)
            self._record_plain(method_id, length, kind, "updated", value)
            return
        stored = self.stored()
        found, old = stored.probe_values(method_id, probe, length) if stored else (False, None)
        if not found:
            self._record_plain(method_id, length, kind, "missing", value)
            pytest.fail(
                f"no {probe} probe baseline for {method_id} at length {length} in {self.baseline_path}; create it "
                f"with: {self.update_command([method_id])}",
                pytrace=False,
            )
        if old is None or value is None:
            from lcc_harness.gate.check import Check

            why = cell.get("na") or "n/a in the baseline"
            self._record_check(method_id, length, kind, Check("n/a", value, None, None, note=why))
            return
        eps, noise = self.policy.for_method(method_id, "kl"), stored.rel_noise(method_id)
        chk = check_kl(new, old, eps, stored.floor, noise)
        self._record_check(method_id, length, kind, chk)
        if chk.outcome == "fail":
            pytest.fail(f"{method_id} {probe} KL at {length}: {chk.message}", pytrace=False)

    def _require_window(self, what: str) -> None:
        """Skip the calling test when the run measures matched-target curves only: the gate, the baselines and
        the claims read window curves."""
        if self.run_config().design == "matched":
            pytest.skip(
                f"{what} reads window curves, and --lcc-design matched measures none; pass --lcc-design both "
                "to gate and measure matched curves in one run"
            )

    def _check(self, kind: str, method_id: str, length: int | None) -> None:
        """One gate case, in the spirit of pytest-regressions' perform_regression_check: obtain the value; when
        updating, stage the method's entry; else compare with the stored per-sample values (gate.check_kl /
        gate.check_growth), record the check and fail the test with its message."""
        from lcc_harness.gate.check import check_growth, check_kl
        from lcc_harness.measure.growth import growth_ratio

        self._require_window("the baseline gate")

        lo, hi = self.lengths[0], self.lengths[-1]
        res = self.result(method_id) if kind == "kl" else self.complete_result(method_id, "growth")
        if kind == "kl" and length in res.errors:
            self._record_plain(method_id, length, kind, "error")
            pytest.fail(res.errors[length], pytrace=False)

        def per(L: int) -> list[float]:
            return res.stats[L].per_sample["window_kl"]

        value = res.stats[length].window_kl if kind == "kl" else growth_ratio(per(lo), per(hi), self.floor())
        if self.update:
            self._stage_entry(method_id)
            self._record_plain(method_id, length, kind, "updated", value)
            return
        stored = self.stored()
        need = (length,) if kind == "kl" else (lo, hi)
        old = [stored.per_sample(method_id, L) if stored else None for L in need]
        if any(o is None for o in old):
            self._record_plain(method_id, length, kind, "missing", value)
            what = (
                f"baseline for {method_id} at length {length}"
                if kind == "kl"
                else f"growth baseline for {method_id}"
            )
            pytest.fail(
                f"no {what} in {self.baseline_path}; create it with: {self.update_command([method_id])}",
                pytrace=False,
            )
        if method_id in self.checkpoints:
            self._check_same_checkpoint(method_id, res, stored)
        eps, noise = self.policy.for_method(method_id, kind), stored.rel_noise(method_id)
        if kind == "kl":
            chk = check_kl(per(length), old[0], eps, stored.floor, noise)
            label = f"{method_id} window KL at {length}"
        else:
            chk = check_growth(value, growth_ratio(old[0], old[1], stored.floor), eps, noise)
            label = f"{method_id} KL growth ×({lo}→{hi})"
        self._record_check(method_id, length, kind, chk)
        if chk.outcome == "fail":
            pytest.fail(f"{label}: {chk.message}", pytrace=False)

    def _check_same_checkpoint(self, name: str, res: Any, stored: Any) -> None:
        """A checkpoint whose file changed since its baseline is another model: fail, never compare silently."""
        now = res.info.get("method_info", {}).get("compressed_sha256")
        then = (stored.methods.get(name, {}).get("method_info") or {}).get("compressed_sha256")
        if now != then:
            pytest.fail(
                f"checkpoint '{name}' ({self.checkpoints[name]}) is not the file its baseline was measured on "
                f"(sha256 {str(then)[:12]}… then, {str(now)[:12]}… now); re-create its baseline with "
                f"{self.update_command([name])} --lcc-compressed {name}={self.checkpoints[name]}, or give it "
                "another name",
                pytrace=False,
            )

    def check_finding(self, claim: str) -> dict[str, Any]:
        """Evaluate one of the paper's claims on the matched-target curves and assert it reproduces the verdict
        stored in the baseline (and was judged on the same target tokens)."""
        from lcc_harness.gate.baselines import findings_basis
        from lcc_harness.gate.check import check_claim
        from lcc_harness.verdicts.claims import CLAIMS, claim_methods, evaluate_claim, missing_roles

        roles = self.profile.roles
        if missing_roles(claim, roles):
            pytest.skip(
                f"claim {claim} needs the role(s) {', '.join(missing_roles(claim, roles))}, which profile "
                f"{self.profile.name} does not define (its model has no such methods)"
            )
        if CLAIMS[claim].data == "copy-ratio":
            return self._check_copy_claim(claim)
        needed = claim_methods(claim, roles)
        missing = [m for m in needed if m not in self.method_ids]
        if missing and self.shard is not None:
            pytest.skip(
                f"claim {claim} needs methods {', '.join(missing)} of other shards; `lcc merge` evaluates it"
            )
        if missing:
            pytest.skip(f"claim {claim} needs methods {', '.join(missing)}, not selected by --lcc-methods")
        if len(self.lengths) < 2:
            pytest.skip(f"claim {claim} needs at least two context lengths")
        if self.engine != "torch":
            pytest.skip(
                f"claim {claim} reads matched-target curves, which the {self.engine} engine does not measure"
            )
        cfg = self.run_config()
        if cfg.design == "window":
            pytest.skip(
                f"claim {claim} reads the matched-target curves, and --lcc-design window measures none; "
                "pass --lcc-design both (the profiles' default)"
            )
        curves = {}
        for m in needed:
            res = self.complete_result(m, f"claim {claim}")
            if res.matched is None or any(L not in res.matched.stats for L in self.lengths):
                pytest.fail(
                    f"claim {claim}: {m} has no matched-target KL at every length "
                    f"({sorted(res.matched.errors.items()) if res.matched else 'none measured'})",
                    pytrace=False,
                )
            curves[m] = {L: res.matched.stats[L].per_sample["window_kl"] for L in self.lengths}
        f = evaluate_claim(claim, roles, curves, self.lengths, self._harness.target)
        basis = findings_basis(self._harness.target)
        chk = check_claim(f, None if self.update else self.stored(), basis)
        self.findings.append(f)
        if self.update:
            return f
        if chk.outcome == "missing":
            pytest.fail(
                f"no stored verdict for claim {claim} in {self.baseline_path}; create it with: "
                f"{self.update_command(needed)}",
                pytrace=False,
            )
        if chk.outcome == "basis":
            pytest.fail(
                f"claim {claim}: the stored verdict was judged on {chk.then}, this run on {basis}; run with "
                f"--lcc-target-tokens {chk.then.get('target_tokens')} or re-create it with "
                f"{self.update_command(needed)}",
                pytrace=False,
            )
        if chk.outcome == "changed":
            pytest.fail(
                f"claim {claim}: verdict changed from '{chk.stored}' to '{f['holds']}' — {f['measured']}",
                pytrace=False,
            )
        return f

    def _check_copy_claim(self, claim: str) -> dict[str, Any]:
        """An informative claim on the copy probe (findings.copy_ratio): evaluated, recorded and stored when
        updating; a changed verdict is reported, never a failure. Skips when a method is not selected or the run
        has no copy probe."""
        from lcc_harness.gate.baselines import findings_basis
        from lcc_harness.gate.check import check_claim
        from lcc_harness.verdicts.claims import claim_methods, copy_ratio, evaluate_claim

        roles = self.profile.roles
        needed = claim_methods(claim, roles)
        missing = [m for m in needed if m not in self.method_ids]
        if missing:
            pytest.skip(f"claim {claim} needs methods {', '.join(missing)}, not selected by --lcc-methods")
        if "copy" not in self.probes():
            pytest.skip(f"claim {claim} reads the copy probe, which this run does not measure (--lcc-probes)")
        curves = {}
        for m in needed:
            res = self.result(m)
            window = {L: s.per_sample["window_kl"] for L, s in res.stats.items()}
            curves[m] = copy_ratio(res.probes, window, self.lengths)
        f = evaluate_claim(claim, roles, curves, self.lengths)
        check_claim(f, None if self.update else self.stored(), findings_basis(self._harness.target))
        self.findings.append(f)
        return f
