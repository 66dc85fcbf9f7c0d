"""pytest fixtures and hooks of the benchmark suite; the session itself is bench/session.py."""

from __future__ import annotations

import shutil
import time
from typing import Any

import pytest

from bench import session as _s
from bench.session import Bench, get_bench, load_average, machine


@pytest.fixture(scope="session")
def bench() -> Bench:
    return get_bench()


@pytest.fixture(autouse=True)
def _load_average(request: pytest.FixtureRequest):
    """Record the load average around every benchmark: the CPU may be shared."""
    before = load_average()
    t0 = time.perf_counter()
    yield
    if _s._BENCH is not None:
        _s._BENCH.loads.append(
            {
                "test": request.node.name,
                "before": before,
                "after": load_average(),
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    b = _s._BENCH
    if b is None:
        return
    try:
        if b.results:
            from bench.report import write_report

            paths = write_report(b, machine(), time.perf_counter() - b.t_start)
            b.results["_written"] = [str(p) for p in paths]
    finally:
        shutil.rmtree(b.cache_dir, ignore_errors=True)  # the session's own temp reference cache


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    b = _s._BENCH
    if b is None or not b.results.get("_written"):
        return
    terminalreporter.section("lcc bench")
    for p in b.results["_written"]:
        terminalreporter.write_line(f"wrote {p}")
