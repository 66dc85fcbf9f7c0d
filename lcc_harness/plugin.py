"""pytest plugin: method fixtures × context-length cases, baseline checks, findings, reports.

Registered through the `pytest11` entry point. Tests use these fixtures:
  lcc_method   — a method id (parametrized from --lcc-methods / the profile; session scope)
  lcc_length   — a context length (parametrized from --lcc-lengths / the profile)
  lcc_result   — the method's MethodResult (computed once per session per method)
  lcc          — the LccSession: check_kl, check_growth, check_finding
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pytest

from .errors import HarnessError
from .record import RunRecord
from .session import LccSession, partial_record, write_baselines

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
        if s._harness is None:  # before loading anything: fail fast, not after the run
            s.check_outputs()
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


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    out = getattr(node, "workeroutput", {}) or {}
    if "lcc" in out:
        s = get_session(node.config)
        s.__dict__.setdefault("_worker_records", []).append(RunRecord.from_dict(json.loads(out["lcc"])))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    s = session.config.stash.get(_KEY, None)
    if s is None:
        return
    if s.is_worker:
        if s.used:
            session.config.workeroutput["lcc"] = json.dumps(partial_record(s).to_dict(), default=str)
        return
    parts = [partial_record(s)] if s.used else []
    parts += getattr(s, "_worker_records", [])
    if not parts:
        return
    rec = RunRecord.merge(parts)
    interrupted = (
        exitstatus
        in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.USAGE_ERROR)
        or session.shouldfail
        or getattr(session, "shouldstop", False)
    )
    if s.update and not interrupted:
        try:
            write_baselines(s, rec)
        except HarnessError as exc:  # e.g. the update would drop entries of another spec: nothing written
            rec.baseline_changes.append(f"baselines NOT written: {exc}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif s.update:
        rec.baseline_changes.append("baselines NOT written: the session was interrupted")
    s.final_record = rec
    try:
        from .report import write_reports

        s.report_files = write_reports(rec.public(), s.report_dir)
    except (OSError, HarnessError) as exc:
        log.error("lcc: could not write reports to %s: %s", s.report_dir, exc)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    s = config.stash.get(_KEY, None)
    rec = getattr(s, "final_record", None) if s is not None else None
    if rec is None:
        return
    tr = terminalreporter
    tr.section("lcc-harness")
    try:
        from .report import terminal_summary

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
