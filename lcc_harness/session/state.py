"""The state of one pytest session of the plugin: options, the Harness (lazy), each method's outcome, the gate's
checks, findings, staged baseline entries, and the run record that reports, xdist workers and baseline updates
read. plugin.py holds only the hooks and fixtures that drive it."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from lcc_harness.errors import BaselineError, HarnessError, NonFiniteError
from lcc_harness.record import MethodOutcome, RunRecord

log = logging.getLogger(__name__)


def _opt(config: pytest.Config, dest: str) -> str | None:
    v = config.getoption(dest, default=None)
    if v is None:
        v = config.getini(dest)
    return v or None


def _policy(config: pytest.Config):
    """The gate's tolerances from --lcc-tolerance / --lcc-growth-tolerance and the per-method ini lists."""
    from lcc_harness.gate.check import DEFAULT_EPS, DEFAULT_GROWTH_EPS, Policy, check_eps, parse_method_eps

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
    from lcc_harness.options import positive_int

    text = _opt(config, f"lcc_{name.replace('-', '_')}")
    return default if text is None else positive_int(name, text)


class LccSession:
    """Per-process state: options, the Harness (lazy), results per method, checks, and the run record."""

    def __init__(self, config: pytest.Config) -> None:
        from lcc_harness.options import DEFAULT_CHUNK, parse_lengths
        from lcc_harness.profiles import get_profile

        self.config = config
        self.profile = get_profile(_opt(config, "lcc_profile") or "default")
        p = self.profile
        self.model = _opt(config, "lcc_model") or p.model
        self.lengths = parse_lengths(_opt(config, "lcc_lengths") or list(p.lengths))
        self.samples = _positive_int(config, "samples", p.samples)
        self.chunk_size = _positive_int(config, "chunk-size", DEFAULT_CHUNK)
        self.policy = _policy(config)
        self.run_options = self._run_options()  # parsed once, now: one usage error for a bad value
        self.engine = self.run_options.get("engine", p.engine)
        self._expected: tuple[str, str] | None = None
        if _opt(config, "lcc_device") or _opt(config, "lcc_dtype"):  # asked for: refuse what cannot run here
            self._check_device()
        root = Path(config.rootpath)
        self.report_dir = Path(_opt(config, "lcc_report_dir") or root / "reports")
        self.baseline_dir = Path(_opt(config, "lcc_baseline_dir") or root / "baselines")
        raw = config.getoption("lcc_methods", default=None)  # '' given on the command line is not "unset"
        methods = raw if raw is not None else _opt(config, "lcc_methods")
        self.checkpoints = _checkpoints(config)  # name → path (--lcc-compressed)
        self.method_ids = [] if self.checkpoints and methods is None else self._select_methods(methods)
        self.method_ids += [n for n in self.checkpoints if n not in self.method_ids]
        self.update = bool(config.getoption("lcc_update_baselines", default=False))
        self.is_worker = hasattr(config, "workerinput")
        self.who = config.workerinput["workerid"] if self.is_worker else f"pid {os.getpid()}"
        self.store = self._run_store()
        self.shard: tuple[int, int] | None = None
        if _opt(config, "lcc_shard"):
            from lcc_harness.options import parse_shard, shard_of

            self.shard = parse_shard(_opt(config, "lcc_shard"))
            self.method_ids = shard_of(self.method_ids, self.shard)
        self.gpu_free: list[list[str]] = []  # controller: GPU groups no worker holds
        self.gpu_held: dict[str, list[str]] = {}
        self._assign_gpus()
        self.stopped_by: str | None = None  # set by the SIGTERM handler (plugin._catch_sigterm)
        self.restore_sigterm = False
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
    def _assign_gpus(self) -> None:
        """--lcc-gpus-per-worker K: the controller splits the visible GPUs into one group of K per xdist worker
        (handed out in pytest_configure_node, taken back when a worker goes down); a worker, or a plain run,
        restricts itself to its group through CUDA_VISIBLE_DEVICES before anything initializes CUDA."""
        from lcc_harness.options import gpu_groups, positive_int

        if self.is_worker:
            gpus = self.config.workerinput.get("lcc_gpus")
            if gpus is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = gpus
            return
        text = _opt(self.config, "lcc_gpus_per_worker")
        if not text:
            return
        k = positive_int("gpus-per-worker", text)
        workers = int(getattr(self.config.option, "numprocesses", 0) or 0) if self.store is not None else 1
        self.gpu_free = gpu_groups(_visible_gpus(), max(workers, 1), k)
        if self.store is None:  # one process: it takes the first group
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpu_free[0])

    def gpus_for(self, worker: str) -> str | None:
        """The GPU group (CUDA_VISIBLE_DEVICES value) for a starting worker; None without --lcc-gpus-per-worker."""
        if not self.gpu_free and not self.gpu_held:
            return None
        group = self.gpu_free.pop(0)
        self.gpu_held[worker] = group
        return ",".join(group)

    def release_gpus(self, worker: str) -> None:
        if worker in self.gpu_held:
            self.gpu_free.insert(0, self.gpu_held.pop(worker))

    def _run_store(self):
        """The folder that xdist's processes of this run share (share.RunStore): created by the controller when
        the run is distributed, handed to each worker in its workerinput; None for a plain run."""
        from lcc_harness.session.share import RunStore

        if self.is_worker:
            path = self.config.workerinput.get("lcc_store")
            return RunStore(path) if path else None
        if getattr(self.config.option, "dist", "no") in (None, "no"):
            return None
        try:
            return RunStore(tempfile.mkdtemp(prefix="lcc-run-"))
        except OSError as exc:
            raise HarnessError(
                f"cannot make the run folder that xdist workers share in {tempfile.gettempdir()} ({exc}); "
                "point TMPDIR to a writable folder"
            ) from None

    def _check_device(self) -> None:
        """Refuse a device or dtype this machine cannot use now, before any test runs (cheap: no model)."""
        from lcc_harness.models.load import dtype_name, resolve_device, resolve_dtype
        from lcc_harness.options import for_pytest

        try:
            if self.engine != "torch":
                from lcc_harness.engines import expected_identity

                self._expected = expected_identity(
                    _opt(self.config, "lcc_device"),
                    _opt(self.config, "lcc_dtype"),
                    self.run_options.get("gpu_layers"),
                )
                return
            dev = resolve_device(_opt(self.config, "lcc_device") or "auto")
            self._expected = (dtype_name(resolve_dtype(_opt(self.config, "lcc_dtype"), dev)), dev.type)
        except HarnessError as exc:
            raise HarnessError(for_pytest(str(exc))) from None

    def _glob(self, pattern: str) -> list[str]:
        """Ids a --lcc-methods glob selects: those of the profile and of this run's baseline file (read
        leniently) that match; when none do, the matching examples of every registered family (built-ins and
        plugins), so that 'myquant-*' finds a plugin's methods while 'rtn-*' keeps to the profile's."""
        from lcc_harness.methods.registry import examples

        ids = list(self.profile.methods)
        with contextlib.suppress(OSError, ValueError, AttributeError):  # unreadable: the checks report it
            ids += list(json.loads(self.baseline_path.read_text()).get("methods", {}))
        hits = [m for m in dict.fromkeys(ids) if fnmatch.fnmatchcase(m, pattern)]
        return hits or [m for m in dict.fromkeys(examples()) if fnmatch.fnmatchcase(m, pattern)]

    def _select_methods(self, text: str | None) -> list[str]:
        if text is None:  # the profile's own ids: valid by construction, nothing to import
            return list(self.profile.methods)
        from lcc_harness.methods.registry import parse_method

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

    def _run_options(self) -> dict[str, Any]:
        """The run options given (--lcc-<key> or ini), converted and checked (options.run_fields; light: no
        torch, so a plain pytest run stays light)."""
        from lcc_harness.options import OPTIONS, run_fields

        return run_fields({o.key: _opt(self.config, o.dest) for o in OPTIONS if o.where == "both"})

    def run_config(self):
        from lcc_harness.engines.torch.harness import RunConfig

        return RunConfig(
            **{
                "anatomy": min(self.profile.anatomy, self.samples) if self.engine == "torch" else 0,
                "probes": self.probes(),
                "design": self.profile.design
                if self.engine == "torch"
                else "window",  # --lcc-design overrides
                **self.run_options,
                "engine": self.engine,
                "model": self.model,
                "lengths": self.lengths,
                "samples": self.samples,
                "chunk_size": self.chunk_size,
                "calib_samples": self.profile.calib_samples,
                "calib_length": self.profile.calib_length,
            }
        )

    def probes(self) -> tuple[str, ...]:
        """The probes this run measures: --lcc-probes, else the profile's that can run at these lengths (light: the
        options alone, no torch — collection calls it)."""
        from lcc_harness.options import feasible_probes

        given = self.run_options.get("probes")
        return tuple(given) if given is not None else feasible_probes(self.profile.probes, self.lengths)

    def gated_probes(self) -> list[str]:
        """The gated probes (baselines.GATED_PROBES) this run measures."""
        from lcc_harness.options import GATED_PROBES

        return [p for p in GATED_PROBES if p in self.probes()]

    def check_outputs(self) -> None:
        """Every place this session writes, checked before any model is loaded: the report directory (writable),
        the baseline directory and file (a folder and a file, writable when updating), the reference cache (a
        folder). A HarnessError names the place and the option that moves it."""
        from lcc_harness.measure.reference import default_cache_dir
        from lcc_harness.report import check_writable

        check_writable(self.report_dir)
        b = self.baseline_path
        if self.baseline_dir.exists() and not self.baseline_dir.is_dir():
            raise HarnessError(
                f"baseline directory '{self.baseline_dir}' is a file; remove it or pass --lcc-baseline-dir"
            )
        if b.is_dir():
            raise HarnessError(
                f"baseline path '{b}' is a directory; remove it or pass another --lcc-baseline-dir"
            )
        if self.update:
            check_writable(self.baseline_dir, "baseline directory", "--lcc-baseline-dir")
        cache = Path(_opt(self.config, "lcc_cache_dir") or default_cache_dir())
        if cache.exists() and not cache.is_dir():
            raise HarnessError(
                f"reference cache '{cache}' is a file, not a folder; remove it or pass --lcc-cache-dir"
            )

    @property
    def harness(self):
        if self._harness is None:
            from lcc_harness.engines import make_harness

            self._harness = make_harness(self.run_config())
            self.used = True
        return self._harness

    # ---- identity / baselines -----------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        from lcc_harness.models.load import dtype_name

        h = self.harness
        return {
            "model": self.model,
            "dtype": dtype_name(h.lm.dtype),
            "device_type": h.lm.device_type,
            "profile": self.profile.name,
            **({"engine": self.engine} if self.engine != "torch" else {}),
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
        """This run's baseline file, from the options alone (model, resolved dtype and device type, profile): known
        before the model loads, and the same file `identity()` names once it has."""
        from lcc_harness.gate.baselines import baseline_path

        if self._expected is None:
            self._check_device()
        return baseline_path(self.baseline_dir, self.model, *self._expected, self.profile.name, self.engine)

    def stored(self) -> Any:
        """The baseline file (None if missing); a corrupt or foreign file fails the calling test, naming it."""
        try:
            return self.baseline
        except BaselineError as exc:
            pytest.fail(str(exc), pytrace=False)

    @property
    def baseline(self):
        """The loaded BaselineFile (None if missing). A corrupt or foreign file raises BaselineError."""
        from lcc_harness.gate.baselines import BaselineFile

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
            if self.store is None:
                o = self._compute(method_id)
            else:  # distributed: once per run, by whichever worker asks first; the others read it
                o = self.store.outcome(method_id, lambda: self._compute(method_id), self.who)
            self.outcomes[method_id] = o
            if o["result"] is not None:
                self.results[method_id] = o["result"]
        return self.outcomes[method_id]

    def _compute(self, method_id: str) -> dict[str, Any]:
        from lcc_harness.engines.torch.harness import is_oom, oom_message
        from lcc_harness.options import for_pytest

        try:
            if method_id in self.checkpoints:
                from lcc_harness.engines.torch.checkpoint import measure_checkpoint

                res = measure_checkpoint(self.harness, self.checkpoints[method_id], method_id)
            else:
                res = self.harness.run(method_id, noise_probe=self.update)
        except NonFiniteError as exc:
            return {"status": "non-finite", "error": str(exc), "result": None}
        except HarnessError as exc:
            return {"status": "error", "error": for_pytest(str(exc)), "result": None}
        except Exception as exc:  # a method's bug surfacing at measurement time (e.g. in a forward hook)
            lines = str(exc).strip().splitlines()
            msg = f"{type(exc).__name__}: {lines[0] if lines else ''}"
            if is_oom(exc):
                msg = for_pytest(oom_message(f"running '{method_id}'", None, exc))
            log.debug("method %s failed", method_id, exc_info=True)
            return {"status": "error", "error": msg, "result": None}
        err = for_pytest("; ".join(res.errors.values()))
        return {"status": "partial" if err else "ok", "error": err, "result": res}

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
        from lcc_harness.verdicts.claims import growth

        if method_id not in self.growth:
            res = self.complete_result(method_id, "growth")
            per = {L: res.stats[L].per_sample["window_kl"] for L in self.lengths}
            g = growth(per, self.lengths, floor=self.floor())
            self.growth[method_id] = g.to_dict()
        return self.growth[method_id]

    def floor(self) -> float:
        """The gate's absolute KL floor: measured now when updating baselines (gate.floor_from_self_noise),
        else the stored baseline's, else the dtype's minimum."""
        from lcc_harness.gate.check import floor_from_self_noise
        from lcc_harness.models.load import dtype_name

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
        from lcc_harness.gate.check import check_growth, check_kl, growth_ratio

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
        from lcc_harness.verdicts.claims import CLAIMS, claim_methods, evaluate_claim

        if CLAIMS[claim].data == "copy-ratio":
            return self._check_copy_claim(claim)
        roles = self.profile.roles
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

    # ---- end of session -----------------------------------------------------------------------
    def record(self) -> RunRecord:
        """This process's RunRecord (reports and baseline updates read the merged one)."""
        import torch
        import transformers

        from lcc_harness import __version__

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
            if self.engine != "torch" and self.outcomes:
                h.engine_floor()  # what no compression costs on this engine: in every llama.cpp report
            md = h.metadata()
            run.update({k: md[k] for k in ("dtype", "device_type", "corpus", "corpus_sha256", "seed")})
            ref = h.reference_built
            run["mode"] = "one-pass" if (ref is None or ref.one_pass) else "per-length"
            run["design"] = h.cfg.design
            if h.cfg.design != "window":
                run["target_tokens"] = h.target
            run["baseline_file"] = _rel(self.baseline_path, Path(self.config.rootpath))
            run["engine"] = self.engine
            for k in ("engine_floor", "threads", "micro_batch", "reference_kv_cache", "llama_cpp_python"):
                if k in md:
                    run[k] = md[k]
            run["sample_spans"] = md["samples"]
            run["notes"] = md.get("notes", [])
        methods = {}
        for mid, o in self.outcomes.items():
            out = MethodOutcome(o["status"], o["error"])
            if o["result"] is not None:
                rd = o["result"].to_dict()
                out.curves, out.timings, out.method_info = rd["curves"], rd["timings"], rd["method_info"]
                out.mode, out.length_dependent = rd["mode"], rd.get("length_dependent")
                out.matched = rd.get("matched")
                out.anatomy = rd.get("anatomy")
                out.probes = rd.get("probes")
            methods[mid] = out
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
        return RunRecord(
            run=run,
            methods=methods,
            checks=list(self.checks),
            growth=growth,
            baselines=baselines,
            findings=list(self.findings),
            baseline_changes=list(self.baseline_changes),
        )


def _checkpoints(config: pytest.Config) -> dict[str, str]:
    """--lcc-compressed NAME=PATH (repeatable) or ini lcc_compressed lines → name → path; a bare PATH is named
    by its file name."""
    items = config.getoption("lcc_compressed", default=None) or config.getini("lcc_compressed") or []
    if not items:
        return {}
    from lcc_harness.engines.torch.checkpoint import (
        check_name,  # imports torch: only when checkpoints are given
    )

    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        name, path = name.strip(), path.strip()
        if not path:
            raise HarnessError(f"--lcc-compressed '{item}' has no path; write NAME=PATH")
        check_name(name, "--lcc-compressed name")
        if name in out and out[name] != path:
            raise HarnessError(
                f"--lcc-compressed name '{name}' is given twice; give each checkpoint its own name"
            )
        out[name] = path
    return out


def _visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else every device torch counts."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip():
        return [g.strip() for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _rel(p: Path, root: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(p)


# ---- session end: xdist transport, baselines, reports -----------------------------------------
def partial_record(s: LccSession) -> RunRecord:
    """The session's record with what a baseline update needs (staged entries, findings, spec, identity, floor)."""
    rec = s.record()
    rec.entries = dict(s.entries)
    rec.staged_findings = {f["claim"]: f["holds"] for f in s.findings}
    rec.spec = s.spec() if s._harness is not None else None
    rec.identity = s.identity() if s._harness is not None else None
    rec.floor = s._floor if s.update else None
    return rec


def write_baselines(s: LccSession, rec: RunRecord) -> None:
    from lcc_harness.gate.baselines import update_from_record

    update_from_record(s.baseline_dir, rec)


def save_part(s: LccSession) -> None:
    """An xdist worker's record into the run folder (share.RunStore.save_part), when it has measured anything."""
    if s.store is not None and s.used:
        s.store.save_part(s.who, partial_record(s))
