"""Writing a run's reports: kl_report.json (files.write_json), kl_report.md, the PNGs; all atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lcc_harness.errors import ReportDirError, WriteError
from lcc_harness.files import atomic_write_many, json_text
from lcc_harness.record import anatomy as _anatomy
from lcc_harness.record import methods as _methods
from lcc_harness.report.fmt import ANATOMY_PNG, PROBES_PNG, REPORT_JSON, REPORT_MD, REPORT_PNG
from lcc_harness.report.markdown import render_markdown
from lcc_harness.report.plot import render_anatomy_png, render_png
from lcc_harness.report.probes import _probe_rows


def _not_writable(
    out_dir: Path, err: BaseException, what: str = "report directory", option: str = "--lcc-report-dir"
) -> ReportDirError:
    if isinstance(err, WriteError):  # already one line naming the file and the fix
        return ReportDirError(str(err))
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return ReportDirError(f"{what} '{out_dir}' is not writable: {reason}; pass {option} to a writable folder")


def check_writable(
    out_dir: str | os.PathLike[str], what: str = "report directory", option: str = "--lcc-report-dir"
) -> Path:
    """Create `out_dir` and prove a file can be written there; raise ReportDirError (a HarnessError) naming
    `what` and the `option` that moves it if not."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".lcc-probe-", dir=out)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise _not_writable(out, e, what, option) from e
    return out


def write_reports(record: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write kl_report.json, kl_report.md and kl_vs_context.png into `out_dir` (created), and kl_anatomy.png when
    some method has an error anatomy (else a stale one is removed); return their paths.

    The JSON is the record itself (sorted keys, indent 1). Raises ReportDirError (an OSError and a
    HarnessError) naming the directory when it cannot be written.
    """
    out = Path(out_dir)
    paths = [out / REPORT_JSON, out / REPORT_MD, out / REPORT_PNG]
    anatomy_png = any(_anatomy(e) is not None for e in _methods(record).values())
    probes_png = bool(_probe_rows(record))
    renderers = [
        lambda: (json_text(record, ascii_only=False) + "\n").encode(),
        lambda: render_markdown(record).encode(),
        lambda: render_png(record),  # last: if plotting fails, the JSON and Markdown are already there
    ]
    if anatomy_png:
        paths.append(out / ANATOMY_PNG)
        renderers.append(lambda: render_anatomy_png(record))
    if probes_png:
        from lcc_harness.report.plot import render_probes_png

        paths.append(out / PROBES_PNG)
        renderers.append(lambda: render_probes_png(record))
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not anatomy_png:  # a previous run's picture would describe other results
            (out / ANATOMY_PNG).unlink(missing_ok=True)
        if not probes_png:
            (out / PROBES_PNG).unlink(missing_ok=True)
    except OSError as e:
        raise _not_writable(out, e) from e
    rendered: list[tuple[Path, bytes]] = []
    try:
        for path, render in zip(paths, renderers, strict=True):
            rendered.append((path, render()))
    finally:  # a plot that fails to render still leaves the JSON and Markdown written (as one set)
        try:
            atomic_write_many(rendered)
        except OSError as e:  # a full disk: every file stays the previous run's
            raise _not_writable(out, e) from e
    return paths
