"""Property-based faults (hypothesis): generated option values and generated baseline JSON thrown at the parsers
and the loader. Whatever comes in, the answer is a value or one HarnessError line naming the problem, never
another exception (a traceback) and never a file left half-written."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lcc_harness.errors import HarnessError
from lcc_harness.gate.baselines import IDENTITY_KEYS, SCHEMA, SPEC_KEYS, BaselineFile, update
from lcc_harness.methods.registry import parse_method
from lcc_harness.options import OPTIONS, OptionError, parse_lengths, run_fields

NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", "1_000", " 7 ", "", "-0", "3.0", "٣"]),
)
TEXT = st.one_of(NUMBERS.map(str), st.text(max_size=40))
FIELDS = [o.key for o in OPTIONS if o.field is not None]


def _one_line(exc: BaseException) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg.strip() and "Traceback" not in msg


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(FIELDS), value=TEXT)
def test_any_option_value_is_a_value_or_one_line(key, value):
    try:
        run_fields({key: value})
    except OptionError as exc:
        _one_line(exc)
        assert f"--{key}" in str(exc)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.lists(TEXT, max_size=5).map(",".join), st.text(max_size=30)))
def test_any_lengths_are_lengths_or_one_line(text):
    try:
        out = parse_lengths(text)
    except HarnessError as exc:
        _one_line(exc)
    else:
        assert out and all(isinstance(v, int) and v > 0 for v in out) and list(out) == sorted(set(out))


ID_PARTS = st.sampled_from(
    [
        "rtn-w",
        "gguf-q",
        "kv-k",
        "kv-",
        "magnitude-s",
        "random-s",
        "mixed-w",
        "wanda-",
        "gptq-w",
        "-g",
        "-seed",
        "+",
        "_",
    ]
)


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.one_of(ID_PARTS, NUMBERS.map(str)), min_size=1, max_size=6))
def test_any_method_id_is_a_method_or_one_line(parts):
    text = "".join(parts)
    try:
        m = parse_method(text)
    except HarnessError as exc:
        _one_line(exc)
    else:
        assert parse_method(m.id) == m  # what parses writes back to itself


IDENTITY = {"model": "tiny-llama", "dtype": "float32", "device_type": "cpu", "profile": "smoke"}
SPEC = {"lengths": [64, 128], "samples": 2, "seed": 0, "corpus_sha256": "c", "samples_sha256": "s"}
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


def _baseline_like(draw_curves):
    base = {"schema": SCHEMA, **IDENTITY, "spec": SPEC, "floor": {"kl": 1e-6}, "findings": {}, "meta": {}}
    base["methods"] = {
        "rtn-w4-g32": {"curves": draw_curves, "growth": {}, "float_noise": {}, "method_info": {}}
    }
    return base


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    doc=st.one_of(
        JSONISH,
        st.dictionaries(st.sampled_from(["64", "128", "x"]), JSONISH, max_size=2).map(_baseline_like),
        st.dictionaries(
            st.sampled_from(["64", "128"]),
            st.fixed_dictionaries(
                {"per_sample": st.lists(NUMBERS, max_size=3), "window_kl": NUMBERS, "cumulative_kl": NUMBERS}
            ),
            max_size=2,
        ).map(_baseline_like),
    )
)
def test_any_baseline_json_loads_or_is_one_line(tmp_path, doc):
    import uuid

    p = tmp_path / f"{uuid.uuid4().hex}.json"
    try:
        p.write_text(json.dumps(doc, allow_nan=True))
    except (TypeError, ValueError):
        return
    try:
        b = BaselineFile.load(p, IDENTITY, SPEC)
    except HarnessError as exc:
        _one_line(exc)
    else:
        assert b is not None and isinstance(b.methods, dict)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(per=st.lists(NUMBERS, min_size=1, max_size=3))
def test_an_update_writes_a_whole_file_or_nothing(tmp_path, per):
    """Entries with generated numbers: the update either writes a valid file or refuses in one line; never a
    partial file or a leftover temp file."""
    import uuid

    p = tmp_path / uuid.uuid4().hex / "b.json"  # tmp_path is shared by hypothesis's examples
    try:
        vals = [float(x) for x in per]
    except (TypeError, ValueError):
        return
    entry = {
        "curves": {"64": {"window_kl": sum(vals) / len(vals), "per_sample": vals, "cumulative_kl": 0.0}},
        "growth": {},
        "float_noise": {"absolute": 0.0, "relative": 0.0},
        "method_info": {},
    }
    try:
        update(p, {**IDENTITY}, {**SPEC}, {}, {"rtn-w4-g32": entry}, {}, {"kl": 1e-6})
    except HarnessError as exc:
        _one_line(exc)
        assert not p.exists()
    else:
        data = json.loads(p.read_text())
        assert all(k in data for k in ("schema", *[k for k in IDENTITY_KEYS if k in IDENTITY])) and SPEC_KEYS
    assert not [f for f in Path(tmp_path).rglob("*.tmp")]
