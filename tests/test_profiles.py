"""The named profiles: every method id and role parses, models are ones the harness knows, and the claims a profile
cannot judge (roles it does not define) are left out rather than failing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcc_harness.methods import parse_method
from lcc_harness.models.embedded import EMBEDDED
from lcc_harness.models.load import TINY_ARCHS, TINY_MODEL
from lcc_harness.options import GATED_PROBES, feasible_probes
from lcc_harness.profiles import EXTRA_ROLES, GEMMA3_ROLES, PROFILES
from lcc_harness.verdicts.claims import CLAIMS, claim_methods, missing_roles


@pytest.mark.parametrize("name", list(PROFILES))
def test_every_profile_names_a_known_model_and_parseable_methods(name):
    p = PROFILES[name]
    assert p.model in EMBEDDED or p.model == TINY_MODEL or p.model.removeprefix("tiny-") in TINY_ARCHS
    assert len(set(p.methods)) == len(p.methods)
    for mid in p.methods:
        assert parse_method(mid).id == mid
    assert list(p.lengths) == sorted(set(p.lengths))


@pytest.mark.parametrize("name", list(PROFILES))
def test_every_claim_either_reads_the_profiles_methods_or_is_left_out(name):
    p = PROFILES[name]
    for claim in CLAIMS:
        if missing_roles(claim, p.roles):
            assert set(CLAIMS[claim].roles) & set(EXTRA_ROLES), (name, claim)
            continue
        if not p.method_ids:  # a profile of the paper's roles measures every method its claims read
            assert set(claim_methods(claim, p.roles)) <= set(p.methods), (name, claim)


def test_gemma3_profiles_override_the_roles_and_add_the_sliding_window_roles():
    g = PROFILES["gemma3"]
    r = g.roles
    assert r["magnitude"] == dict(GEMMA3_ROLES)["magnitude"] != PROFILES["default"].roles["magnitude"]
    assert r["random10"] == tuple(f"random-s5-seed{k}" for k in range(g.mask_seeds))
    assert (r["kv_swa"], r["kv_full"]) == ("kv-k2v2-swa", "kv-k2v2-full")
    assert {"kv-k2v2-swa", "kv-k2v2-full"} <= set(g.methods)
    assert not missing_roles("sliding-window-grows-less", r)
    assert missing_roles("sliding-window-grows-less", PROFILES["default"].roles) == ["kv_swa", "kv_full"]


COMMITTED = sorted((Path(__file__).resolve().parents[1] / "baselines").glob("*.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_a_committed_baseline_covers_its_profiles_methods_lengths_and_gated_probes(path):
    """A profile changed without regenerating its baseline (a method, a length, a probe added) fails here, not in
    a user's run: `pytest suites/ --lcc-profile <name>` against this file would lack the new cases' baselines."""
    data = json.loads(path.read_text())
    p = PROFILES[data["profile"]]
    assert data["spec"]["lengths"] == list(p.lengths)
    assert data["spec"]["samples"] == p.samples
    assert set(data["methods"]) == set(p.methods)
    gated = [n for n in feasible_probes(p.probes, p.lengths) if n in GATED_PROBES]
    for mid, entry in data["methods"].items():
        stored = entry.get("probes", {})
        assert sorted(stored) == sorted(gated), (mid, sorted(stored))
        for name in gated:
            assert sorted(map(int, stored[name])) == list(p.lengths), (mid, name)


def test_the_committed_baselines_include_every_run_profile():
    names = {json.loads(f.read_text())["profile"] for f in COMMITTED}
    assert {"smoke", "default", "paper", "llamacpp", "gemma3"} <= names
