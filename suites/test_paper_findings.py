"""The paper's findings as verdicts: each claim's measured verdict must reproduce the stored one.

Whether a claim holds on the model is a measured fact recorded in the baseline; a change that flips it fails.
"""

import pytest

from lcc_harness.verdicts.claims import CLAIMS


@pytest.mark.parametrize("claim", list(CLAIMS))
def test_paper_finding_reproduces(lcc, claim, record_property):
    with lcc.properties(record_property):
        lcc.check_finding(claim)
