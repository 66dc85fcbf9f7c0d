"""pytest plugin: method fixtures × context-length cases, baseline checks, findings, reports.

Registered through the `pytest11` entry point. Tests use these fixtures:
  lcc_method   — a method id (parametrized from --lcc-methods / the profile; session scope)
  lcc_length   — a context length (parametrized from --lcc-lengths / the profile)
  lcc_result   — the method's MethodResult (computed once per session per method)
  lcc          — the LccSession: check_kl, check_growth, check_finding
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest

from lcc_harness.errors import HarnessError
from lcc_harness.record import RunRecord
from lcc_harness.session.state import LccSession, partial_record, write_baselines

log = logging.getLogger(__name__)


def pytest_addoption(parser: pytest.Parser) -> None:
    from lcc_harness.options import add_pytest_options

    add_pytest_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running cases (paper profile, long contexts)")
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device; skipped with a reason where none is present"
    )
    from lcc_harness.options import OptionError, for_pytest

    try:
        session = LccSession(config)
    except (HarnessError, OptionError) as exc:
        raise pytest.UsageError(for_pytest(str(exc))) from None
    config.stash[_KEY] = session
    if session.is_worker and session.store is not None:
        _WORKER[:] = [session]
    if not session.is_worker:
        _catch_sigterm(session)


def _catch_sigterm(session: LccSession) -> None:
    """SIGTERM (what CI sends on cancel or timeout) stops the run like Ctrl-C: reports for the methods that
    finished, baselines untouched, a line saying why. Only where nobody else handles SIGTERM; a second one kills."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        session.stopped_by = "SIGTERM"
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    session.restore_sigterm = True


def pytest_unconfigure(config: pytest.Config) -> None:
    s = config.stash.get(_KEY, None)
    _WORKER.clear()
    if getattr(s, "restore_sigterm", False):
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if s is not None and s.store is not None and not s.is_worker:
        import shutil

        shutil.rmtree(s.store.path, ignore_errors=True)


_KEY = pytest.StashKey["LccSession"]()


def get_session(config: pytest.Config) -> LccSession:
    return config.stash[_KEY]


# ---- parametrization and fixtures -------------------------------------------------------------
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    s = metafunc.config.stash.get(_KEY, None)
    if s is None:
        return
    if "lcc_method" in metafunc.fixturenames:
        # each method's cases run on one worker under `--dist loadgroup` (see xdist_sched.GroupScheduling)
        params = [pytest.param(m, id=m, marks=pytest.mark.xdist_group(m)) for m in s.method_ids]
        metafunc.parametrize("lcc_method", params, scope="session")
    if "lcc_length" in metafunc.fixturenames:
        metafunc.parametrize("lcc_length", list(s.lengths), ids=[str(L) for L in s.lengths])
    if (
        "lcc_probe" in metafunc.fixturenames
    ):  # the gated probes this run measures (none: not collected, below)
        metafunc.parametrize("lcc_probe", s.gated_probes(), scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    s = config.stash.get(_KEY, None)
    if s is not None:  # cases that do not apply to this run are not collected (not skipped, not deselected)
        items[:] = [it for it in items if not _not_applicable(s, it)]
    cuda: bool | None = None  # torch is imported only when some item is marked gpu
    for item in items:
        if item.get_closest_marker("gpu") and cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        if item.get_closest_marker("gpu") and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is available here"))
        if (
            s is not None
            and s.profile.slow
            and item.get_closest_marker("slow") is None
            and "lcc" in getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.slow)


def _not_applicable(s: LccSession, item: pytest.Item) -> bool:
    """A probe case of a run without gated probes, a claim on a probe this run does not measure, or a claim whose
    roles the profile does not define (the sliding-window claim on a model without sliding-window layers)."""
    if "lcc_probe" in getattr(item, "fixturenames", ()) and not s.gated_probes():
        return True
    claim = getattr(getattr(item, "callspec", None), "params", {}).get("claim")
    if isinstance(claim, str):
        from lcc_harness.verdicts.claims import CLAIMS, missing_roles

        c = CLAIMS.get(claim)
        if c is not None and missing_roles(claim, s.profile.roles):
            return True
        return c is not None and c.data == "copy-ratio" and "copy" not in s.probes()
    return False


@pytest.fixture(scope="session")
def lcc(request: pytest.FixtureRequest) -> LccSession:
    """The session's LccSession (checks, results, baselines)."""
    s = get_session(request.config)
    try:
        if s._harness is None:  # before loading anything: fail fast, not after the run
            s.check_outputs()
        s.harness  # noqa: B018 - build model, corpus and samples now, so errors surface once, clearly
    except HarnessError as exc:
        from lcc_harness.options import for_pytest

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


# ---- pytest-xdist: one shared run folder, a scheduler that survives crashed workers ---------------------------
@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    s = node.config.stash.get(_KEY, None)
    if s is not None and s.store is not None:
        node.workerinput["lcc_store"] = str(s.store.path)
    gpus = s.gpus_for(node.gateway.id) if s is not None else None
    if gpus is not None:
        node.workerinput["lcc_gpus"] = gpus


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    s = node.config.stash.get(_KEY, None)
    if s is not None:
        s.release_gpus(node.gateway.id)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") == "loadgroup":
        from lcc_harness.session.xdist_sched import GroupScheduling

        s = config.stash.get(_KEY, None)
        return GroupScheduling(config, log, s.method_ids if s is not None else [])
    return None


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    """A worker's record goes to the run folder after every test: the controller has it if the worker dies."""
    import contextlib

    from lcc_harness.session.state import save_part

    s = _session_of_worker()
    if s is not None:
        with contextlib.suppress(OSError, HarnessError):
            save_part(s)


_WORKER: list[LccSession] = []  # the worker's session (pytest_runtest_logfinish gets no config)


def _session_of_worker() -> LccSession | None:
    return _WORKER[0] if _WORKER else None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    s = session.config.stash.get(_KEY, None)
    if s is None:
        return
    if s.is_worker:
        from lcc_harness.session.state import save_part

        save_part(s)
        return
    parts = [partial_record(s)] if s.used else []
    if s.store is not None:
        parts += s.store.parts()
    if not parts:
        return
    rec = RunRecord.merge(parts)
    interrupted = (
        exitstatus
        in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.USAGE_ERROR)
        or session.shouldfail
        or getattr(session, "shouldstop", False)
    )
    if s.store is not None and not interrupted:  # stopped runs leave methods unfinished on purpose
        rec.add_unfinished(s.store.unfinished())
    if s.update and not interrupted:
        try:
            write_baselines(s, rec)
        except HarnessError as exc:  # e.g. the update would drop entries of another spec: nothing written
            rec.baseline_changes.append(f"baselines NOT written: {exc}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif s.update:
        rec.baseline_changes.append("baselines NOT written: the session was interrupted")
    if s.stopped_by:
        rec.run["stopped_by"] = s.stopped_by
        done = sum(o.status in ("ok", "partial") for o in rec.methods.values())
        rec.baseline_changes.append(
            f"run stopped by {s.stopped_by}: the report covers the {done} method(s) that finished"
        )
    s.final_record = rec
    try:
        from lcc_harness.report import append_step_summary, write_reports

        s.report_files = write_reports(rec.public(), s.report_dir)
        s.report_files.append(rec.write(s.report_dir))
        append_step_summary(rec.public())  # when GITHUB_STEP_SUMMARY names a file (GitHub Actions)
    except (OSError, HarnessError) as exc:  # e.g. a full disk: the previous reports stay whole, the run fails
        s.report_error = f"lcc: could not write reports to {s.report_dir}: {exc}"
        log.error("%s", s.report_error)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    s = config.stash.get(_KEY, None)
    rec = getattr(s, "final_record", None) if s is not None else None
    if rec is None:
        return
    tr = terminalreporter
    tr.section("lcc-harness")
    if getattr(s, "report_error", None):
        tr.write_line(s.report_error, red=True)
    try:
        from lcc_harness.report import terminal_summary

        tr.write_line(terminal_summary(rec.public()))
    except ImportError:
        pass
    for c in rec.baseline_changes:
        tr.write_line(f"baseline: {c}")
    better = [c for c in rec.checks if c["outcome"] == "better"]
    if better:
        tr.write_line(f"{len(better)} check(s) clearly better than baseline; consider --lcc-update-baselines")
    changed = [c for c in rec.checks if c["outcome"] == "changed"]
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
