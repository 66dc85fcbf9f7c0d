"""pytest plugin: method fixtures × context-length cases, baseline checks, findings, reports.

Registered through the `pytest11` entry point. Tests use these fixtures:
  lcc_method   — a method id (parametrized from --lcc-methods / the profile; session scope)
  lcc_length   — a context length (parametrized from --lcc-lengths / the profile)
  lcc_result   — the method's MethodResult (computed once per session per method)
  lcc          — the LccSession: check_kl, check_growth, check_finding
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from .errors import BaselineError, HarnessError, NonFiniteError

log = logging.getLogger(__name__)


def pytest_addoption(parser: pytest.Parser) -> None:
    from .options import add_pytest_options

    add_pytest_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running cases (paper profile, long contexts)")
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device; skipped with a reason where none is present"
    )
    from .options import OptionError, for_pytest

    try:
        session = LccSession(config)
    except (HarnessError, OptionError) as exc:
        raise pytest.UsageError(for_pytest(str(exc))) from None
    config.stash[_KEY] = session


_KEY = pytest.StashKey["LccSession"]()


def _opt(config: pytest.Config, dest: str) -> str | None:
    v = config.getoption(dest, default=None)
    if v is None:
        v = config.getini(dest)
    return v or None


def _policy(config: pytest.Config):
    """The gate's tolerances from --lcc-tolerance / --lcc-growth-tolerance and the per-method ini lists."""
    from .gate import DEFAULT_EPS, DEFAULT_GROWTH_EPS, Policy, check_eps, parse_method_eps

    try:
        eps, geps = (_opt(config, f"lcc_{k}") for k in ("tolerance", "growth_tolerance"))
        return Policy(
            eps=DEFAULT_EPS if eps is None else check_eps(eps, "--lcc-tolerance"),
            growth_eps=DEFAULT_GROWTH_EPS if geps is None else check_eps(geps, "--lcc-growth-tolerance"),
            per_method=parse_method_eps(config.getini("lcc_method_tolerance"), "ini lcc_method_tolerance"),
            per_method_growth=parse_method_eps(
                config.getini("lcc_method_growth_tolerance"), "ini lcc_method_growth_tolerance"
            ),
        )
    except ValueError as exc:
        raise HarnessError(str(exc)) from None


def _positive_int(config: pytest.Config, name: str, default: int) -> int:
    """--lcc-<name> as an integer ≥ 1, or `default` when not given; anything else is an OptionError."""
    from .options import positive_int

    text = _opt(config, f"lcc_{name.replace('-', '_')}")
    return default if text is None else positive_int(name, text)


class LccSession:
    """Per-process state: options, the Harness (lazy), results per method, checks, and the run record."""

    def __init__(self, config: pytest.Config) -> None:
        from .options import DEFAULT_CHUNK, parse_lengths
        from .profiles import get_profile

        self.config = config
        self.profile = get_profile(_opt(config, "lcc_profile") or "default")
        p = self.profile
        self.model = _opt(config, "lcc_model") or p.model
        self.lengths = parse_lengths(_opt(config, "lcc_lengths") or list(p.lengths))
        self.samples = _positive_int(config, "samples", p.samples)
        self.chunk_size = _positive_int(config, "chunk-size", DEFAULT_CHUNK)
        self.policy = _policy(config)
        self._expected: tuple[str, str] | None = None
        if _opt(config, "lcc_device") or _opt(config, "lcc_dtype"):  # asked for: refuse what cannot run here
            self._check_device()
        root = Path(config.rootpath)
        self.report_dir = Path(_opt(config, "lcc_report_dir") or root / "reports")
        self.baseline_dir = Path(_opt(config, "lcc_baseline_dir") or root / "baselines")
        raw = config.getoption("lcc_methods", default=None)  # '' given on the command line is not "unset"
        self.method_ids = self._select_methods(raw if raw is not None else _opt(config, "lcc_methods"))
        self.update = bool(config.getoption("lcc_update_baselines", default=False))
        self.is_worker = hasattr(config, "workerinput")
        self._harness = None
        self.outcomes: dict[str, dict[str, Any]] = {}
        self.results: dict[str, Any] = {}
        self.checks: list[dict[str, Any]] = []
        self.growth: dict[str, dict[str, Any]] = {}
        self.findings: list[dict[str, Any]] = []
        self.entries: dict[str, dict[str, Any]] = {}
        self.baseline_changes: list[str] = []
        self.started = _now()
        self.used = False
        self._baseline = None
        self._baseline_loaded = False
        self._floor: dict[str, float] | None = None

    # ---- configuration -------------------------------------------------------------------------
    def _check_device(self) -> None:
        """Refuse a device or dtype this machine cannot use now, before any test runs (cheap: no model)."""
        from .models import dtype_name, resolve_device, resolve_dtype
        from .options import for_pytest

        try:
            dev = resolve_device(_opt(self.config, "lcc_device") or "auto")
            self._expected = (dtype_name(resolve_dtype(_opt(self.config, "lcc_dtype"), dev)), dev.type)
        except HarnessError as exc:
            raise HarnessError(for_pytest(str(exc))) from None

    def _glob(self, pattern: str) -> list[str]:
        """Ids a --lcc-methods glob selects: those of the profile and of this run's baseline file (read
        leniently) that match; when none do, the matching examples of every registered family (built-ins and
        plugins), so that 'myquant-*' finds a plugin's methods while 'rtn-*' keeps to the profile's."""
        from .baselines import baseline_path
        from .methods.registry import examples

        ids = list(self.profile.methods)
        if self._expected is None:
            self._check_device()
        path = baseline_path(self.baseline_dir, self.model, *self._expected, self.profile.name)
        with contextlib.suppress(OSError, ValueError, AttributeError):  # unreadable: the checks report it
            ids += list(json.loads(path.read_text()).get("methods", {}))
        hits = [m for m in dict.fromkeys(ids) if fnmatch.fnmatchcase(m, pattern)]
        return hits or [m for m in dict.fromkeys(examples()) if fnmatch.fnmatchcase(m, pattern)]

    def _select_methods(self, text: str | None) -> list[str]:
        if text is None:  # the profile's own ids: valid by construction, nothing to import
            return list(self.profile.methods)
        from .methods.registry import parse_method

        out: list[str] = []
        for tok in (t.strip() for t in text.split(",")):
            if not tok:
                continue
            if any(ch in tok for ch in "*?["):
                hits = self._glob(tok)
                if not hits:
                    raise HarnessError(
                        f"--lcc-methods pattern '{tok}' matches no known method id (the profile's, every "
                        "registered family's examples, and the baseline's); give ids or another pattern"
                    )
                out.extend(h for h in hits if h not in out)
            else:
                mid = parse_method(tok).id  # validates; raises MethodError with suggestions
                if mid not in out:
                    out.append(mid)
        if not out:
            raise HarnessError(
                f"--lcc-methods '{text}' selects no method; give comma-separated ids or globs, e.g. "
                "--lcc-methods 'rtn-*,wanda-s50' (see `lcc methods`)"
            )
        return out

    def run_config(self):
        from .options import OPTIONS, run_fields
        from .run import RunConfig

        given = {o.key: _opt(self.config, o.dest) for o in OPTIONS if o.where == "both"}
        return RunConfig(
            **{
                **run_fields(given),
                "model": self.model,
                "lengths": self.lengths,
                "samples": self.samples,
                "chunk_size": self.chunk_size,
                "calib_samples": self.profile.calib_samples,
                "calib_length": self.profile.calib_length,
            }
        )

    @property
    def harness(self):
        if self._harness is None:
            from .run import Harness

            self._harness = Harness(self.run_config())
            self.used = True
        return self._harness

    # ---- identity / baselines -----------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        from .models import dtype_name

        h = self.harness
        return {
            "model": self.model,
            "dtype": dtype_name(h.lm.dtype),
            "device_type": h.lm.device_type,
            "profile": self.profile.name,
        }

    def spec(self) -> dict[str, Any]:
        import hashlib

        h = self.harness
        prov = json.dumps([s.span.to_dict() for s in h.samples], sort_keys=True).encode()
        return {
            "lengths": list(self.lengths),
            "samples": self.samples,
            "seed": h.cfg.seed,
            "corpus_sha256": h.corpus.fingerprint,
            "samples_sha256": hashlib.sha256(prov).hexdigest(),
            "corpus": h.corpus.name,
            "calibration": {"count": h.cfg.calib_samples, "length": h.cfg.calib_length},
        }

    @property
    def baseline_path(self) -> Path:
        from .baselines import baseline_path

        i = self.identity()
        return baseline_path(self.baseline_dir, i["model"], i["dtype"], i["device_type"], i["profile"])

    def stored(self) -> Any:
        """The baseline file (None if missing); a corrupt or foreign file fails the calling test, naming it."""
        try:
            return self.baseline
        except BaselineError as exc:
            pytest.fail(str(exc), pytrace=False)

    @property
    def baseline(self):
        """The loaded BaselineFile (None if missing). A corrupt or foreign file raises BaselineError."""
        from .baselines import BaselineFile

        if not self._baseline_loaded:
            self._baseline = BaselineFile.load(self.baseline_path, self.identity(), self.spec())
            self._baseline_loaded = True
        return self._baseline

    def update_command(self, methods: list[str]) -> str:
        return (
            f"pytest suites/ --lcc-profile {self.profile.name} --lcc-methods {','.join(methods)} "
            "--lcc-update-baselines"
        )

    # ---- results ------------------------------------------------------------------------------
    def outcome(self, method_id: str) -> dict[str, Any]:
        """Run a method once per session; returns {'status': ok|partial|error|non-finite, 'error', 'result'}.

        'partial': some lengths ran out of memory (result.errors); the others were measured."""
        if method_id not in self.outcomes:
            from .options import for_pytest
            from .run import is_oom, oom_message

            try:
                res = self.harness.run(method_id, noise_probe=self.update)
                err = for_pytest("; ".join(res.errors.values()))
                self.outcomes[method_id] = {"status": "partial" if err else "ok", "error": err, "result": res}
                self.results[method_id] = res
            except NonFiniteError as exc:
                self.outcomes[method_id] = {"status": "non-finite", "error": str(exc), "result": None}
            except HarnessError as exc:
                self.outcomes[method_id] = {"status": "error", "error": for_pytest(str(exc)), "result": None}
            except Exception as exc:  # a method's bug surfacing at measurement time (e.g. in a forward hook)
                lines = str(exc).strip().splitlines()
                msg = f"{type(exc).__name__}: {lines[0] if lines else ''}"
                if is_oom(exc):
                    msg = for_pytest(oom_message(f"running '{method_id}'", None, exc))
                self.outcomes[method_id] = {"status": "error", "error": msg, "result": None}
                log.debug("method %s failed", method_id, exc_info=True)
        return self.outcomes[method_id]

    def result(self, method_id: str):
        """The MethodResult; a method that failed makes the calling test fail, naming the method."""
        o = self.outcome(method_id)
        if o["status"] == "non-finite":
            pytest.fail(f"{method_id}: non-finite output — {o['error']}", pytrace=False)
        if o["status"] == "error":
            pytest.fail(f"{method_id}: {o['error']}", pytrace=False)
        return o["result"]

    def complete_result(self, method_id: str, what: str):
        """The MethodResult when every length was measured; else the calling test fails naming the lengths."""
        res = self.result(method_id)
        if res.errors:
            pytest.fail(
                f"{method_id}: {what} needs every length, but length(s) {sorted(res.errors)} failed: "
                f"{res.errors[min(res.errors)]}",
                pytrace=False,
            )
        return res

    def growth_of(self, method_id: str) -> dict[str, Any]:
        from .findings import growth

        if method_id not in self.growth:
            res = self.complete_result(method_id, "growth")
            per = {L: res.stats[L].per_sample["window_kl"] for L in self.lengths}
            g = growth(per, self.lengths, seed=self.harness.cfg.seed, floor=self.floor())
            self.growth[method_id] = g.to_dict()
        return self.growth[method_id]

    def floor(self) -> float:
        """The gate's absolute KL floor: measured now when updating baselines (gate.floor_from_self_noise),
        else the stored baseline's, else the dtype's minimum."""
        from .gate import floor_from_self_noise
        from .models import dtype_name

        if self._floor is None:
            dtype = dtype_name(self.harness.lm.dtype)
            if self.update:
                noise = self.harness.self_noise()
                self._floor = {"kl": floor_from_self_noise(noise, dtype), "self_noise": noise}
            else:
                try:
                    b = self.baseline
                except HarnessError:
                    b = None
                self._floor = {"kl": b.floor if b is not None else floor_from_self_noise(0.0, dtype)}
        return self._floor["kl"]

    def _stage_entry(self, method_id: str) -> None:
        from .baselines import method_entry

        res = self.complete_result(method_id, "a baseline entry")
        curves = {str(L): res.stats[L].to_dict() for L in self.lengths}
        info = dict(res.info.get("method_info", {}))
        noise = info.pop("float_noise", None) or {"absolute": 0.0, "relative": 0.0}
        self.entries[method_id] = method_entry(curves, self.growth_of(method_id), noise, info)

    def _record_check(self, method_id: str, length: int | None, kind: str, chk) -> None:
        self.checks.append({"method": method_id, "length": length, "kind": kind, **chk.to_dict()})

    def _record_plain(self, method_id: str, length: int | None, kind: str, outcome: str, value=None) -> None:
        from .gate import Check

        self._record_check(method_id, length, kind, Check(outcome, value, None, None))

    # ---- checks used by the suites ------------------------------------------------------------
    def check_kl(self, method_id: str, length: int) -> None:
        """Fail when the mean window KL at `length` exceeds the baseline's by more than the tolerance
        (gate.check_kl: max(ε·baseline, floor, K_NOISE·noise))."""
        from .gate import check_kl

        res = self.result(method_id)
        if length in res.errors:
            self._record_plain(method_id, length, "kl", "error")
            pytest.fail(res.errors[length], pytrace=False)
        value = res.stats[length].window_kl
        if self.update:
            self._stage_entry(method_id)
            self._record_plain(method_id, length, "kl", "updated", value)
            return
        stored = self.stored()
        old = stored.per_sample(method_id, length) if stored else None
        if old is None:
            self._record_plain(method_id, length, "kl", "missing", value)
            pytest.fail(
                f"no baseline for {method_id} at length {length} in {self.baseline_path}; create it "
                f"with: {self.update_command([method_id])}",
                pytrace=False,
            )
        chk = check_kl(
            res.stats[length].per_sample["window_kl"],
            old,
            self.policy.for_method(method_id, "kl"),
            stored.floor,
            stored.rel_noise(method_id),
        )
        self._record_check(method_id, length, "kl", chk)
        if chk.outcome == "fail":
            pytest.fail(f"{method_id} window KL at {length}: {chk.message}", pytrace=False)

    def check_growth(self, method_id: str) -> None:
        """Fail when growth (mean window KL at the longest ÷ the shortest length) exceeds the baseline's beyond
        its tolerance; n/a (passes) when either run has KL ~0 at the shortest length."""
        from .gate import check_growth, growth_ratio

        res = self.complete_result(method_id, "growth")
        lo, hi = self.lengths[0], self.lengths[-1]
        if self.update:
            self._stage_entry(method_id)
            self._record_plain(method_id, None, "growth", "updated", self.growth_of(method_id)["ratio"])
            return
        stored = self.stored()
        old_lo, old_hi = (stored.per_sample(method_id, L) if stored else None for L in (lo, hi))
        new = growth_ratio(
            res.stats[lo].per_sample["window_kl"], res.stats[hi].per_sample["window_kl"], self.floor()
        )
        if old_lo is None or old_hi is None:
            self._record_plain(method_id, None, "growth", "missing", new)
            pytest.fail(
                f"no growth baseline for {method_id} in {self.baseline_path}; create it with: "
                f"{self.update_command([method_id])}",
                pytrace=False,
            )
        chk = check_growth(
            new,
            growth_ratio(old_lo, old_hi, stored.floor),
            self.policy.for_method(method_id, "growth"),
            stored.rel_noise(method_id),
        )
        self._record_check(method_id, None, "growth", chk)
        if chk.outcome == "fail":
            pytest.fail(f"{method_id} KL growth ×({lo}→{hi}): {chk.message}", pytrace=False)

    def check_finding(self, claim: str) -> dict[str, Any]:
        """Evaluate one of the paper's claims and assert it reproduces the verdict stored in the baseline."""
        from .findings import CLAIMS, evaluate_claim

        roles = self.profile.roles
        needed = [roles[r] for r in CLAIMS[claim].roles]
        missing = [m for m in needed if m not in self.method_ids]
        if missing:
            pytest.skip(f"claim {claim} needs methods {', '.join(missing)}, not selected by --lcc-methods")
        if len(self.lengths) < 2:
            pytest.skip(f"claim {claim} needs at least two context lengths")
        curves = {}
        for m in needed:
            res = self.complete_result(m, f"claim {claim}")
            curves[m] = {L: res.stats[L].per_sample["window_kl"] for L in self.lengths}
        f = evaluate_claim(claim, roles, curves, self.lengths, seed=self.harness.cfg.seed)
        baseline = None if self.update else self.stored()
        stored = None if baseline is None else baseline.findings.get(claim)
        f["stored"] = stored
        f["reproduced"] = None if stored is None else stored == f["holds"]
        self.findings.append(f)
        if self.update:
            return f
        if stored is None:
            pytest.fail(
                f"no stored verdict for claim {claim} in {self.baseline_path}; create it with: "
                f"{self.update_command(needed)}",
                pytrace=False,
            )
        if stored != f["holds"]:
            pytest.fail(
                f"claim {claim}: verdict changed from '{stored}' to '{f['holds']}' — {f['measured']}",
                pytrace=False,
            )
        return f

    # ---- end of session -----------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        import torch
        import transformers

        from . import __version__

        h = self._harness
        run: dict[str, Any] = {
            "profile": self.profile.name,
            "model": self.model,
            "lengths": list(self.lengths),
            "samples": self.samples,
            "started": self.started,
            "finished": _now(),
            "update": self.update,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "harness": __version__,
            },
        }
        if h is not None:
            md = h.metadata()
            run.update({k: md[k] for k in ("dtype", "device_type", "corpus", "corpus_sha256", "seed")})
            ref = h.reference_built
            run["mode"] = "one-pass" if (ref is None or ref.one_pass) else "per-length"
            run["baseline_file"] = _rel(self.baseline_path, Path(self.config.rootpath))
            run["sample_spans"] = md["samples"]
            run["notes"] = md.get("notes", [])
        methods = {}
        for mid, o in self.outcomes.items():
            d: dict[str, Any] = {"status": o["status"], "error": o["error"]}
            if o["result"] is not None:
                rd = o["result"].to_dict()
                d.update({"curves": rd["curves"], "timings": rd["timings"], "method_info": rd["method_info"]})
                d["mode"] = rd["mode"]
                if rd.get("length_dependent"):
                    d["length_dependent"] = rd["length_dependent"]
            methods[mid] = d
        baselines = {}
        b = None
        if h is not None and not self.update:
            try:
                b = self.baseline
            except HarnessError:
                b = None
        if b is not None:
            baselines = {m: b.methods[m] for m in methods if m in b.methods}
        growth = {}
        for mid, g in self.growth.items():
            growth[mid] = dict(g)
            growth[mid]["baseline_verdict"] = baselines.get(mid, {}).get("growth", {}).get("verdict")
        return {
            "run": run,
            "methods": methods,
            "checks": self.checks,
            "growth": growth,
            "baselines": baselines,
            "findings": self.findings,
            "baseline_changes": self.baseline_changes,
        }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _rel(p: Path, root: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(p)


def get_session(config: pytest.Config) -> LccSession:
    return config.stash[_KEY]


# ---- parametrization and fixtures -------------------------------------------------------------
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    s = metafunc.config.stash.get(_KEY, None)
    if s is None:
        return
    if "lcc_method" in metafunc.fixturenames:
        metafunc.parametrize("lcc_method", s.method_ids, ids=s.method_ids, scope="session")
    if "lcc_length" in metafunc.fixturenames:
        metafunc.parametrize("lcc_length", list(s.lengths), ids=[str(L) for L in s.lengths])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    s = config.stash.get(_KEY, None)
    cuda: bool | None = None  # torch is imported only when some item is marked gpu
    for item in items:
        if item.get_closest_marker("gpu") and cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        if item.get_closest_marker("gpu") and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is available here"))
        callspec = getattr(item, "callspec", None)
        if s is not None and callspec is not None and "lcc_method" in callspec.params:
            # keep each method's tests on one xdist worker (use --dist loadgroup)
            item.add_marker(pytest.mark.xdist_group(callspec.params["lcc_method"]))
        if (
            s is not None
            and s.profile.slow
            and item.get_closest_marker("slow") is None
            and "lcc" in getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def lcc(request: pytest.FixtureRequest) -> LccSession:
    """The session's LccSession (checks, results, baselines)."""
    s = get_session(request.config)
    try:
        if s._harness is None:
            from .report import check_writable

            check_writable(s.report_dir)  # before loading anything: fail fast, not after the run
        s.harness  # noqa: B018 - build model, corpus and samples now, so errors surface once, clearly
    except HarnessError as exc:
        from .options import for_pytest

        msg = f"lcc: {for_pytest(' '.join(str(exc).split()))}"
    else:
        return s
    if s.is_worker:  # pytest.exit in an xdist worker crashes the controller: stop this worker instead
        request.session.shouldstop = msg
        pytest.fail(msg, pytrace=False)
    pytest.exit(msg, returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(scope="session")
def lcc_result(lcc: LccSession, lcc_method: str):
    """The MethodResult of the parametrized method (once per session)."""
    o = lcc.outcome(lcc_method)
    if o["status"] == "error":  # setup fails: the method's tests are reported as errors, naming it
        pytest.fail(f"{lcc_method}: {o['error']}", pytrace=False)
    return o["result"]


# ---- session end: xdist transport, baselines, reports -----------------------------------------
def _partial(s: LccSession) -> dict[str, Any]:
    rec = s.record()
    rec["entries"] = s.entries
    rec["staged_findings"] = {f["claim"]: f["holds"] for f in s.findings}
    rec["spec"] = s.spec() if s._harness is not None else None
    rec["identity"] = s.identity() if s._harness is not None else None
    rec["floor"] = s._floor if s.update else None
    return rec


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    out = getattr(node, "workeroutput", {}) or {}
    if "lcc" in out:
        s = get_session(node.config)
        s.__dict__.setdefault("_worker_records", []).append(json.loads(out["lcc"]))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    s = session.config.stash.get(_KEY, None)
    if s is None:
        return
    if s.is_worker:
        if s.used:
            session.config.workeroutput["lcc"] = json.dumps(_partial(s), default=str)
        return
    parts = [_partial(s)] if s.used else []
    parts += getattr(s, "_worker_records", [])
    if not parts:
        return
    rec = _merge(parts)
    interrupted = (
        exitstatus
        in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.USAGE_ERROR)
        or session.shouldfail
        or getattr(session, "shouldstop", False)
    )
    if s.update and not interrupted:
        _write_baselines(s, rec)
    elif s.update:
        rec["baseline_changes"].append("baselines NOT written: the session was interrupted")
    s.final_record = rec
    try:
        from .report import write_reports

        s.report_files = write_reports(_public(rec), s.report_dir)
    except (OSError, HarnessError) as exc:
        log.error("lcc: could not write reports to %s: %s", s.report_dir, exc)


def _public(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in rec.items() if k not in ("entries", "staged_findings", "spec", "identity", "floor")
    }


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    base = dict(next((p for p in parts if p.get("identity")), parts[0]))
    for key in ("methods", "growth", "baselines", "entries", "staged_findings"):
        base[key] = {}
        for p in parts:
            base[key].update(p.get(key) or {})
    base["floor"] = next((p["floor"] for p in parts if p.get("floor")), None)
    for key in ("checks", "findings", "baseline_changes"):
        base[key] = [x for p in parts for x in (p.get(key) or [])]
    return base


def _write_baselines(s: LccSession, rec: dict[str, Any]) -> None:
    from . import __version__
    from .baselines import baseline_path, update

    if not rec.get("entries") and not rec.get("staged_findings"):
        return
    ident, spec = rec["identity"], rec["spec"]
    path = baseline_path(
        s.baseline_dir, ident["model"], ident["dtype"], ident["device_type"], ident["profile"]
    )
    meta = {
        "versions": rec["run"]["versions"],
        "harness": __version__,
        "updated": rec["run"]["finished"][:10],
    }
    changes = update(path, ident, spec, meta, rec["entries"], rec["staged_findings"], rec.get("floor"))
    rec["baseline_changes"].extend(changes or [f"{path.name}: no change"])


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    s = config.stash.get(_KEY, None)
    rec = getattr(s, "final_record", None) if s is not None else None
    if rec is None:
        return
    tr = terminalreporter
    tr.section("lcc-harness")
    try:
        from .report import terminal_summary

        tr.write_line(terminal_summary(_public(rec)))
    except ImportError:
        pass
    for c in rec.get("baseline_changes", []):
        tr.write_line(f"baseline: {c}")
    better = [c for c in rec.get("checks", []) if c["outcome"] == "better"]
    if better:
        tr.write_line(f"{len(better)} check(s) clearly better than baseline; consider --lcc-update-baselines")
    changed = [c for c in rec.get("checks", []) if c["outcome"] == "changed"]
    if changed:
        tr.write_line(
            f"{len(changed)} check(s) changed beyond float noise but inside the tolerance: "
            + ", ".join(
                f"{c['method']}@{c['length'] or 'growth'} {c.get('message', '')}" for c in changed[:5]
            )
        )
    for f in getattr(s, "report_files", []) or []:
        tr.write_line(f"report: {f}")


if os.environ.get("LCC_DEBUG"):
    logging.basicConfig(level=logging.DEBUG)
