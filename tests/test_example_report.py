"""The committed example runs (reports/example/: a default-profile `make report`; its gemma3/ and paper/ folders: the
`gemma3` profile and the merged `paper` profile): each record renders its report.

Rendering the record (`RunRecord.public()` → `write_reports`, what the session does at its end) gives the committed
kl_report.json exactly: no field is left out (the run's timestamps and versions are in the record itself, so they
come back unchanged). The committed kl_report.md is what this code renders from it, and its first 40 lines hold
every claim's verdict and every method's gate line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcc_harness.record import RECORD_FILE, RunRecord
from lcc_harness.report import REPORT_JSON, REPORT_MD, render_markdown, write_reports

ROOT = Path(__file__).resolve().parents[1] / "reports" / "example"
EXAMPLES = [ROOT, ROOT / "gemma3", ROOT / "paper"]  # a folder without its record fails every test below


@pytest.fixture(scope="module", params=EXAMPLES, ids=lambda d: d.name)
def example(request) -> Path:
    return request.param


@pytest.fixture(scope="module")
def record(example) -> RunRecord:
    return RunRecord.from_dict(json.loads((example / RECORD_FILE).read_text()))


def test_the_record_renders_the_committed_json(example, record, tmp_path):
    write_reports(record.public(), tmp_path)
    assert json.loads((tmp_path / REPORT_JSON).read_text()) == json.loads((example / REPORT_JSON).read_text())


def test_the_committed_markdown_is_what_the_record_renders(example, record):
    assert (example / REPORT_MD).read_text() == render_markdown(record.public())


def test_the_first_40_lines_hold_every_verdict_and_every_gate_line(example, record):
    head = (example / REPORT_MD).read_text().splitlines()[:40]
    public = record.public()
    assert public["findings"] and public["methods"]
    for f in public["findings"]:
        line = next((x for x in head if f"`{f['claim']}`" in x), None)
        assert line is not None, f"claim {f['claim']} is not in the first 40 lines"
        assert f"**{f['holds']}**" in line
    for mid in public["methods"]:
        row = next((x for x in head if x.startswith(f"| `{mid}`")), None)
        assert row is not None, f"method {mid} has no gate line in the first 40 lines"
        gate = row.split("|")[2].strip()
        outcomes = {c["outcome"] for c in public["checks"] if c["method"] == mid}
        passing = "pass" in outcomes and outcomes <= {"pass", "n/a"}
        assert (gate == "✅ pass") == passing, (mid, gate, outcomes)
