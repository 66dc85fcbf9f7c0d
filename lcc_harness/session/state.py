"""The state of one pytest session of the plugin: options, the Harness (lazy), each method's outcome, the gate's
checks, findings, staged baseline entries, and the run record that reports, xdist workers and baseline updates
read. plugin.py holds only the hooks and fixtures that drive it."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lcc_harness.errors import BaselineError, HarnessError, NonFiniteError
from lcc_harness.record import MethodOutcome, RunRecord
from lcc_harness.session.cases import Cases
from lcc_harness.session.config import SessionConfig, _checkpoints, _opt, _policy, _positive_int

log = logging.getLogger(__name__)


class LccSession(Cases, SessionConfig):
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
        from lcc_harness.engines.results import is_oom, oom_message
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
        from lcc_harness.measure.growth import growth

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
            "commit": _commit(Path(self.config.rootpath)),
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


def _commit(root: Path) -> str | None:
    """The commit checked out at `root` (12 hex digits), or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


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
