"""Faults in the files the harness keeps: baselines (corrupt, foreign, killed mid-write, concurrent writers)
and the reference cache (stale after a corpus or version change, or an entry of another key at its path)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lcc_harness.errors import BaselineError
from lcc_harness.gate.baselines import SCHEMA, BaselineFile, update
from lcc_harness.measure import reference as reference_mod
from lcc_harness.measure.reference import build_reference
from lcc_harness.models.corpus import TokenizedCorpus, default_corpus, load_corpus

IDENTITY = {"model": "tiny-llama", "dtype": "float32", "device_type": "cpu", "profile": "smoke"}
SPEC = {"lengths": [64, 128], "samples": 2, "seed": 0, "corpus_sha256": "c" * 64, "samples_sha256": "s" * 64}
FLOOR = {"kl": 1e-6, "self_noise": 0.0}


def entry(kl: float) -> dict:
    """A method entry as baselines.method_entry writes it: two samples of `kl` at each length."""
    curves = {str(L): {"window_kl": kl, "per_sample": [kl, kl], "cumulative_kl": kl} for L in (64, 128)}
    return {
        "curves": curves,
        "growth": {"ratio": 1.0, "verdict": "flat"},
        "float_noise": {"absolute": 0.0, "relative": 0.0},
        "method_info": {},
    }


def write_old(path: Path, n_methods: int = 40) -> bytes:
    """A valid baseline file with many entries (so that a write takes more than one syscall's worth)."""
    entries = {f"old-{i}": entry(0.1 + i) for i in range(n_methods)}
    update(path, IDENTITY, SPEC, {"harness": "old"}, entries, {}, FLOOR)
    return path.read_bytes()


def _edit(good: str, fn) -> str:
    data = json.loads(good)
    fn(data)
    return json.dumps(data)


def _set(path: str, value):
    """An edit that sets the '|'-separated key `path` to `value` (a number indexes a list)."""

    def fn(data):
        *keys, last = path.split("|")
        for k in keys:
            data = data[int(k)] if isinstance(data, list) else data[k]
        data[int(last) if isinstance(data, list) else last] = value

    return fn


# ---- loading: corrupt, wrong schema, foreign --------------------------------------------------------------

BAD_FILES = {
    "truncated JSON": lambda good: good[: len(good) // 2],
    "not JSON": lambda good: "<<<<<<< HEAD\n",
    "not UTF-8": lambda good: b"\xff\xfe{}".decode("latin-1"),
    "wrong schema": lambda good: good.replace(SCHEMA, "lcc-baseline/0"),
    "a list": lambda good: "[1, 2]",
    "entry without per-sample values": lambda good: good.replace('"per_sample"', '"samples"'),
    "methods not an object": lambda good: json.dumps({**json.loads(good), "methods": ["a"]}),
    # numbers that would disable or break the gate
    "Infinity KL": lambda g: _edit(g, _set("methods|old-0|curves|64|per_sample|0", float("inf"))),
    "NaN KL": lambda g: _edit(g, _set("methods|old-0|curves|128|per_sample|1", float("nan"))),
    "negative KL": lambda g: _edit(g, _set("methods|old-1|curves|64|per_sample|0", -0.5)),
    "KL as a string": lambda g: _edit(g, _set("methods|old-1|curves|64|per_sample|0", "0.1")),
    "one value too few": lambda g: _edit(g, _set("methods|old-0|curves|64|per_sample", [0.1])),
    "mean not of its samples": lambda g: _edit(g, _set("methods|old-0|curves|64|window_kl", 0.05)),
    "huge float noise": lambda g: _edit(g, _set("methods|old-0|float_noise|relative", 1e308)),
    "negative float noise": lambda g: _edit(g, _set("methods|old-0|float_noise|absolute", -1.0)),
    "huge floor": lambda g: _edit(g, _set("floor|kl", 1e308)),
    "zero floor": lambda g: _edit(g, _set("floor|kl", 0)),
    "no floor": lambda g: _edit(g, lambda d: d.pop("floor")),
}
NAMED_KEY = {
    "Infinity KL": "methods.old-0.curves.64.per_sample[0]",
    "NaN KL": "methods.old-0.curves.128.per_sample[1]",
    "negative KL": "methods.old-1.curves.64.per_sample[0]",
    "one value too few": "methods.old-0.curves.64.per_sample",
    "mean not of its samples": "methods.old-0.curves.64.window_kl",
    "huge float noise": "methods.old-0.float_noise.relative",
    "huge floor": "floor.kl",
}


@pytest.mark.parametrize("damage", list(BAD_FILES))
def test_corrupt_or_malformed_baseline_is_an_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "b.json"
    write_old(path, 2)
    text = BAD_FILES[damage](path.read_text())
    path.write_bytes(text.encode("latin-1") if damage == "not UTF-8" else text.encode())
    with pytest.raises(BaselineError) as ei:
        BaselineFile.load(path, IDENTITY, SPEC)  # never None ("no baseline")
    msg = str(ei.value)
    assert str(path) in msg and "--lcc-update-baselines" in msg and "\n" not in msg
    assert NAMED_KEY.get(damage, "") in msg


def test_baseline_with_nan_is_never_written(tmp_path):
    path = tmp_path / "b.json"
    bad = entry(0.1)
    bad["curves"]["64"]["per_sample"][0] = float("nan")
    with pytest.raises(BaselineError, match="refusing to write"):
        update(path, IDENTITY, SPEC, {}, {"m": bad}, {}, FLOOR)
    assert not path.exists()
    from lcc_harness.gate.baselines import write_json_atomic

    with pytest.raises(BaselineError, match=r"a\.b\[1\] is NaN or Infinity"):
        write_json_atomic(path, {"a": {"b": [1.0, float("inf")]}})
    assert not path.exists() and not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize(
    "key,value", [("model", "smollm2-135m"), ("dtype", "bfloat16"), ("device_type", "cuda")]
)
def test_baseline_of_another_model_dtype_or_device_is_an_error(tmp_path, key, value):
    path = tmp_path / "b.json"
    write_old(path, 1)
    with pytest.raises(
        BaselineError, match=f"is for {key}='{IDENTITY[key]}' but this run has '{value}'"
    ) as ei:
        BaselineFile.load(path, {**IDENTITY, key: value}, SPEC)
    assert str(path) in str(ei.value)


def test_missing_baseline_is_none_and_valid_one_loads(tmp_path):
    assert BaselineFile.load(tmp_path / "none.json", IDENTITY, SPEC) is None
    path = tmp_path / "b.json"
    write_old(path, 3)
    b = BaselineFile.load(path, IDENTITY, SPEC)
    assert b.per_sample("old-2", 64) == [2.1, 2.1] and b.per_sample("old-0", 256) is None
    assert b.floor == 1e-6 and b.rel_noise("old-0") == 0.0


# ---- writing: killed at any moment, concurrent writers --------------------------------------------------

CHILD = """
import json, sys
from pathlib import Path
from lcc_harness.gate.baselines import update
ident, spec, entries, floor = json.loads(sys.argv[2])
update(Path(sys.argv[1]), ident, spec, {"harness": "new"}, entries, {}, floor)
"""


def spawn_update(path: Path, entries: dict, pause: float) -> subprocess.Popen:
    env = {**os.environ, "LCC_TEST_SLOW_WRITE": str(pause)}
    arg = json.dumps([IDENTITY, SPEC, entries, FLOOR])
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path), arg], env=env)


def temps(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def wait_for(cond, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.005)


def assert_old_or_complete_new(path: Path, old: bytes, new_ids: list[str]) -> str:
    data = path.read_bytes()
    if data == old:
        return "old"
    parsed = json.loads(data)  # complete: parses, holds the old entries and the new ones
    assert {f"old-{i}" for i in range(40)} | set(new_ids) == set(parsed["methods"])
    assert BaselineFile.load(path, IDENTITY, SPEC) is not None
    return "new"


PAUSE = 1.0  # seconds the writer stalls half-way through the temp file and again before the rename


@pytest.mark.slow
@pytest.mark.parametrize(
    "moment", ["at start", "mid temp file", "temp complete, before rename", "after rename"]
)
def test_sigkill_during_baseline_update_leaves_old_or_complete_file(tmp_path, moment):
    path = tmp_path / "baselines" / "b.json"
    old = write_old(path)
    proc = spawn_update(path, {"added": entry(0.5)}, PAUSE)
    if moment == "mid temp file":
        wait_for(lambda: temps(path))
        time.sleep(0.3 * PAUSE)
    elif moment == "temp complete, before rename":
        wait_for(lambda: temps(path))
        time.sleep(1.5 * PAUSE)
    elif moment == "after rename":
        wait_for(lambda: path.read_bytes() != old)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    state = assert_old_or_complete_new(path, old, ["added"])
    left = temps(path)
    if moment == "mid temp file":
        assert state == "old" and len(left) == 1
        with pytest.raises(json.JSONDecodeError):  # the kill really hit a half-written temp file
            json.loads(left[0].read_text())
    elif moment == "temp complete, before rename":
        assert state == "old" and len(left) == 1 and "added" in json.loads(left[0].read_text())["methods"]
    elif moment == "after rename":
        assert state == "new"
    # the next update cleans up what the killed writer left and merges as usual
    update(path, IDENTITY, SPEC, {}, {"later": entry(0.7)}, {}, FLOOR)
    assert temps(path) == []
    assert_old_or_complete_new(path, old, ["later"] + (["added"] if state == "new" else []))


@pytest.mark.slow
def test_concurrent_updates_from_separate_processes_lose_no_entry(tmp_path):
    path = tmp_path / "b.json"
    old = write_old(path)
    procs = [spawn_update(path, {f"new-{i}": entry(i)}, 0.1) for i in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    assert_old_or_complete_new(path, old, [f"new-{i}" for i in range(4)])
    assert temps(path) == []


def test_update_replaces_a_corrupt_or_foreign_file_and_says_so(tmp_path):
    path = tmp_path / "b.json"
    path.write_text("{ truncated")
    changes = update(path, IDENTITY, SPEC, {}, {"m": entry(0.1)}, {}, FLOOR)
    assert any("unreadable old file replaced" in c for c in changes)
    path.write_text(json.dumps({"schema": "other/9", "methods": {}}))
    changes = update(path, IDENTITY, SPEC, {}, {"m": entry(0.1)}, {}, FLOOR)
    assert any("another schema" in c for c in changes)
    assert BaselineFile.load(path, IDENTITY, SPEC).per_sample("m", 64) == [0.1, 0.1]


# ---- reference cache: stale entries are recomputed -------------------------------------------------------

LENGTHS = (32, 64)


@pytest.fixture(scope="module")
def samples(tiny):
    return TokenizedCorpus(default_corpus(), tiny.tokenizer).draw(2, 64, seed=0)


def same_hidden(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(x, y) for P in a for x, y in zip(a[P], b[P], strict=True))


def test_reference_cache_not_reused_when_the_corpus_changes(tiny, samples, tmp_path):
    cache = tmp_path / "cache"
    build_reference(tiny, samples, LENGTHS, cache_dir=cache)
    doc = tmp_path / "other.txt"
    doc.write_text("A different corpus: " + "lorem ipsum dolor sit amet " * 20)
    other = TokenizedCorpus(load_corpus(doc), tiny.tokenizer).draw(2, 64, seed=0)
    ref = build_reference(tiny, other, LENGTHS, cache_dir=cache)
    assert not ref.cache_hit
    assert same_hidden(ref.hidden, build_reference(tiny, other, LENGTHS, use_cache=False).hidden)
    assert build_reference(tiny, samples, LENGTHS, cache_dir=cache).cache_hit  # the first entry still serves


@pytest.mark.parametrize("what", ["CACHE_FORMAT", "harness", "torch", "transformers"])
def test_reference_cache_not_reused_after_a_version_change(tiny, samples, tmp_path, monkeypatch, what):
    import transformers

    cache = tmp_path / "cache"
    build_reference(tiny, samples, LENGTHS, cache_dir=cache)
    assert build_reference(tiny, samples, LENGTHS, cache_dir=cache).cache_hit
    if what == "CACHE_FORMAT":
        monkeypatch.setattr(reference_mod, "CACHE_FORMAT", reference_mod.CACHE_FORMAT + 1)
    elif what == "harness":
        monkeypatch.setattr(reference_mod, "__version__", "99.0.0")
    else:
        monkeypatch.setattr({"torch": torch, "transformers": transformers}[what], "__version__", "99.0.0")
    assert not build_reference(tiny, samples, LENGTHS, cache_dir=cache).cache_hit


def test_reference_cache_entry_of_another_key_at_the_path_is_recomputed(tiny, samples, tmp_path):
    """A file at the expected name written for another key (other version or samples) is never used."""
    cache = tmp_path / "cache"
    a = build_reference(tiny, samples, LENGTHS, cache_dir=cache)
    b = build_reference(tiny, samples[:1], LENGTHS, cache_dir=cache)
    path_a = cache / f"ref-{a.key[:32]}.safetensors"
    shutil.copyfile(cache / f"ref-{b.key[:32]}.safetensors", path_a)  # a's name, b's content
    with pytest.warns(UserWarning, match="unusable"):
        again = build_reference(tiny, samples, LENGTHS, cache_dir=cache)
    assert not again.cache_hit and same_hidden(again.hidden, a.hidden)


def test_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    from lcc_harness.files import atomic_write

    old = os.umask(0o022)
    try:
        p = atomic_write(tmp_path / "a.bin", b"x")
        q = atomic_write(tmp_path / "b.bin", lambda tmp: Path(tmp).write_bytes(b"y"))
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777, q.stat().st_mode & 0o777) == (0o644, 0o644)
    assert q.read_bytes() == b"y" and not list(tmp_path.glob(".*.tmp"))


def test_reference_cache_entry_with_the_right_key_but_wrong_shapes_is_recomputed(tiny, samples, tmp_path):
    cache = tmp_path / "cache"
    a = build_reference(tiny, samples, LENGTHS, cache_dir=cache)
    path = cache / f"ref-{a.key[:32]}.safetensors"
    bad = {P: [t[: P // 2] for t in ts] for P, ts in a.hidden.items()}  # truncated, but checksummed and keyed
    reference_mod._save(path, a.key, bad, a.summaries, {"one_pass": "1", "notes": "[]"})
    with pytest.warns(UserWarning, match="does not match the samples|unusable"):
        again = build_reference(tiny, samples, LENGTHS, cache_dir=cache)
    assert not again.cache_hit and same_hidden(again.hidden, a.hidden)


def test_an_update_with_another_spec_never_drops_other_methods(tmp_path):
    path = tmp_path / "b.json"
    write_old(path, 3)
    before = path.read_bytes()
    other = {**SPEC, "samples": 2, "seed": 1}
    with pytest.raises(
        BaselineError, match=r"other seed; updating only \['old-0'\] would drop 2 other method"
    ):
        update(path, IDENTITY, other, {}, {"old-0": entry(0.3)}, {}, FLOOR)
    assert path.read_bytes() == before
    # re-measuring every method of the file under the new spec replaces it
    changes = update(path, IDENTITY, other, {}, {f"old-{i}": entry(0.3) for i in range(3)}, {}, FLOOR)
    assert any("all 3 entries re-measured" in c for c in changes)
    assert BaselineFile.load(path, IDENTITY, other).per_sample("old-2", 64) == [0.3, 0.3]
