"""Configuration: what the pytest options and the profile ask for, validated once — the methods, the run's RunConfig, GPUs, devices and the places the session writes"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lcc_harness.errors import HarnessError

if TYPE_CHECKING:
    from lcc_harness.engines.results import RunConfig


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


class SessionConfig:
    """LccSession's configuration (a part of LccSession; it reads the harness's state)."""

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

    def run_config(self) -> RunConfig:
        """The run's typed configuration (engines.results.RunConfig), built and validated once per session from
        the options and the profile; the harness and every case read this one record."""
        from lcc_harness.engines.results import RunConfig

        if self.__dict__.get("_run_config") is not None:
            return self.__dict__["_run_config"]
        self.__dict__["_run_config"] = cfg = RunConfig(
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
        return cfg

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
        from lcc_harness.files import default_cache_dir
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
