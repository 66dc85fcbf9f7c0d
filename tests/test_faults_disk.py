"""Runs that find the disk full, and runs that share one cache: what was there before stays whole, nothing is
left half-written, the message is one line naming the file.

A full disk is played by the file size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so that a write fails with
EFBIG instead of killing the process): every write past the limit fails the way a write on a full disk does
(ENOSPC), in every file the run writes — reference cache, reports, baselines, --json, GGUF conversions.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_faults_plugin import BASELINE, make_project

LIMIT = 400  # bytes: every file a run writes is larger (the tiny model's reference cache, report, baseline)


def _full_disk() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def _run(cmd: list[str], cwd: Path, full: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=cwd,
        preexec_fn=_full_disk if full else None,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        **kw,
    )


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_a_set_of_files_is_written_whole_or_not_at_all(tmp_path):
    """The report set (JSON, Markdown, plots): a file that does not fit leaves every target as it was."""
    from lcc_harness.errors import WriteError
    from lcc_harness.files import atomic_write_many

    a, b = tmp_path / "a.json", tmp_path / "b.md"
    a.write_text("old a")
    b.write_text("old b")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
    try:
        with pytest.raises(WriteError, match=r"could not write '.*b\.md': File too large; .* free space"):
            atomic_write_many([(a, b"a" * (LIMIT // 2)), (b, b"b" * (2 * LIMIT))])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert (a.read_text(), b.read_text()) == ("old a", "old b") and _temps(tmp_path) == []
    assert atomic_write_many([(a, b"new a"), (b, b"new b")]) == [a, b]
    assert (a.read_text(), b.read_text()) == ("new a", "new b") and _temps(tmp_path) == []


@pytest.mark.slow
@pytest.mark.slow
def test_full_disk_under_lcc_measure_is_one_line_and_keeps_the_old_json(tmp_path):
    out, cache = tmp_path / "out.json", tmp_path / "cache"
    out.write_text("old\n")
    r = _run(
        [sys.executable, "-m", "lcc_harness.cli", "measure", "--model", "tiny-llama", "--method", "rtn-w4-g32",
         "--lengths", "64,128", "--samples", "1", "--json", str(out), "--cache-dir", str(cache)],
        tmp_path,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("lcc: error:")]
    assert len(errors) == 1 and f"could not write '{out}'" in errors[0] and "free space" in errors[0], (
        r.stderr
    )
    assert out.read_text() == "old\n"
    # the reference cache could not be written either: a warning, the run went on, no partial entry
    assert "reference cache not written, the run goes on without it" in r.stderr
    assert not list(cache.glob("*.safetensors")) and _temps(tmp_path) == []
    # with room again, the same command writes both
    r = _run(r.args, tmp_path, full=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["method"] == "rtn-w4-g32" and list(cache.glob("ref-*.safetensors"))


@pytest.mark.slow
@pytest.mark.slow
def test_full_disk_under_pytest_keeps_baselines_and_the_previous_reports_whole(tmp_path):
    project = make_project(tmp_path / "project", tmp_path / "cache")
    baseline = project / BASELINE
    baseline.parent.mkdir()
    baseline.write_text('{"schema": "lcc-baseline/1", "note": "must survive byte for byte"}\n')
    reports = project / "reports"
    reports.mkdir()
    old = {name: f"previous run's {name}\n" for name in ("kl_report.json", "kl_report.md")}
    for name, text in old.items():
        (reports / name).write_text(text)
    r = _run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--lcc-methods", "rtn-w4-g32",
         "--lcc-update-baselines", "test_kl_regression.py"],
        project,
    )  # fmt: skip
    text = r.stdout + r.stderr
    assert r.returncode == pytest.ExitCode.TESTS_FAILED, text
    assert "Traceback" not in text
    assert f"baselines NOT written: could not write '{baseline}'" in text
    assert "could not write reports" in text and "free space" in text
    assert baseline.read_text().endswith('"must survive byte for byte"}\n')
    # the report set is the previous run's, every file of it: never a new JSON beside an old Markdown
    assert {name: (reports / name).read_text() for name in old} == old
    assert _temps(project) == [] and _temps(tmp_path / "cache") == []


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    pytest.importorskip("gguf", reason="the llama.cpp engine's files need gguf-py (lcc-harness[llamacpp])")
    from _gguf_util import tiny_vocab_size, write_tiny_llama_gguf

    from lcc_harness.models.load import build_tiny_llama

    model = build_tiny_llama(
        7,
        vocab_size=tiny_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
    ).eval()
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)


CONVERT = """
import sys
from pathlib import Path
from lcc_harness.engines.llamacpp.gguf_files import reference_gguf
from lcc_harness.errors import HarnessError
try:
    print(reference_gguf(Path(sys.argv[1]), "float32", Path(sys.argv[2])))
except HarnessError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.slow
@pytest.mark.slow
def test_full_disk_while_converting_the_reference_gguf_is_one_line_and_leaves_no_part(tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    r = _run([sys.executable, "-c", CONVERT, str(tiny_gguf), str(cache)], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: could not write '") and ".gguf'" in line and "free space" in line
    assert not list(cache.rglob("*.gguf")) and _temps(cache) == []
    r = _run(r.args, tmp_path, full=False)  # room again: converted
    assert r.returncode == 0 and Path(r.stdout.strip()).is_file(), r.stderr


def _converted_path(tiny_gguf: Path, cache: Path) -> Path:
    from lcc_harness.files import file_sha256

    return cache / "llama.cpp" / f"{tiny_gguf.stem}-{file_sha256(tiny_gguf)[:16]}.F32.gguf"


@pytest.mark.slow
@pytest.mark.slow
def test_a_second_run_on_the_cache_waits_for_the_first_runs_conversion_and_reads_it(tiny_gguf, tmp_path):
    """Two runs sharing one cache: the one that finds the entry locked waits, then reads what the other wrote
    instead of converting again (the file here is a stand-in the waiting run could not have made itself)."""
    from filelock import FileLock

    cache = tmp_path / "cache"
    out = _converted_path(tiny_gguf, cache)
    out.parent.mkdir(parents=True)
    lock = FileLock(str(out.with_suffix(".lock")))
    lock.acquire()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", CONVERT, str(tiny_gguf), str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(5)  # long enough to import and reach the lock (the conversion itself takes < 1 s)
        assert proc.poll() is None, proc.communicate()
        out.write_bytes(tiny_gguf.read_bytes())  # "the first run" finishes its file
    finally:
        lock.release()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert Path(stdout.strip()) == out and out.read_bytes() == tiny_gguf.read_bytes()


@pytest.mark.slow
@pytest.mark.slow
def test_a_run_killed_while_converting_leaves_nothing_the_next_run_trips_on(tiny_gguf, tmp_path):
    """SIGKILL while holding the entry's lock and half-way through the temp file: the lock dies with the process,
    the temp file is never read, the next run converts."""
    cache = tmp_path / "cache"
    out = _converted_path(tiny_gguf, cache)
    out.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); l.acquire(); "
         "open(sys.argv[2], 'wb').write(b'GGUF half'); print('held', flush=True); time.sleep(600)",
         str(out.with_suffix(".lock")), str(out.parent / f".{out.name}.dead.tmp")],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()
        holder.wait()
    r = _run([sys.executable, "-c", CONVERT, str(tiny_gguf), str(cache)], tmp_path, full=False)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == out and out.read_bytes()[:4] == b"GGUF" and out.stat().st_size > 1000
