"""KL regression gates: each method × each context length against the stored baseline.

Method ids and lengths come from the profile (--lcc-profile) or --lcc-methods / --lcc-lengths.
"""


def test_kl_within_baseline(lcc, lcc_result, lcc_method, lcc_length, record_property):
    """Window KL at this length must not exceed the baseline by more than its tolerance."""
    with lcc.properties(record_property):
        lcc.check_kl(lcc_method, lcc_length)


def test_kl_growth_within_baseline(lcc, lcc_result, lcc_method, record_property):
    """Growth (window KL at the longest ÷ shortest length) must not exceed the baseline's."""
    with lcc.properties(record_property):
        lcc.check_growth(lcc_method)


def test_probe_kl_within_baseline(lcc, lcc_result, lcc_method, lcc_length, lcc_probe, record_property):
    """Long-range probes (--lcc-probes): key-token KL and copy KL at this length must not exceed the baseline by more
    than the window-KL tolerance; n/a where the reference itself fails the probe."""
    with lcc.properties(record_property):
        lcc.check_probe(lcc_method, lcc_length, lcc_probe)
