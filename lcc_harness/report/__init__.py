"""Reports of one run record: the summary first (summary.py), then the detail tables (curves.py, sections.py,
probes.py) in kl_report.md (markdown.py), the JSON and the pictures (write.py, plot.py). Input is the record the
session assembles (record.py); nothing here reaches back into models or measurements."""

from lcc_harness.report.curves import engine_floor_table, stats_block_tables
from lcc_harness.report.fmt import (
    ANATOMY_PNG,
    DP_COLUMNS,
    PROBES_PNG,
    REPORT_JSON,
    REPORT_MD,
    REPORT_PNG,
    fmt_dp,
    fmt_kl,
    fmt_pct,
    fmt_signed,
)
from lcc_harness.report.markdown import render_markdown
from lcc_harness.report.probes import probe_tables
from lcc_harness.report.sections import super_weight_warning
from lcc_harness.report.summary import append_step_summary, summary_lines, summary_markdown, terminal_summary
from lcc_harness.report.write import check_writable, write_reports

__all__ = [
    "append_step_summary",
    "summary_lines",
    "summary_markdown",
    "ANATOMY_PNG",
    "DP_COLUMNS",
    "PROBES_PNG",
    "REPORT_JSON",
    "REPORT_MD",
    "REPORT_PNG",
    "check_writable",
    "engine_floor_table",
    "fmt_dp",
    "fmt_kl",
    "fmt_pct",
    "fmt_signed",
    "probe_tables",
    "render_markdown",
    "stats_block_tables",
    "super_weight_warning",
    "terminal_summary",
    "write_reports",
]
