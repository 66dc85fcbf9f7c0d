"""Bad input and faults through the `lcc` CLI: exit status 2 and one line `lcc: error: …` naming the problem
and the fix, no traceback unless --debug. Runs in-process on the tiny model, offline."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _faulty import register_all, unregister_all
from _gguf_util import tiny_vocab_size, write_tiny_llama_gguf

from lcc_harness.cli import main
from lcc_harness.errors import MethodRunError
from lcc_harness.models.load import build_tiny_llama

BASE = [
    "measure",
    "--model",
    "tiny-llama",
    "--method",
    "rtn-w4-g32",
    "--lengths",
    "64",
    "--samples",
    "1",
    "--device",
    "cpu",
    "--quiet",
    "--no-cache",
]


pytestmark = pytest.mark.usefixtures("offline")  # every test: no network, empty HF cache (conftest)


@pytest.fixture()
def faulty():
    register_all()
    yield
    unregister_all()


def lcc(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what preparing the case printed
    rc = main([*BASE, *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(rc: int, err: str, *words: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lcc: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ---- files the cases need ----------------------------------------------------------------------------


def _gguf(tmp: Path, cut: Callable[[bytes], bytes]) -> str:
    path = write_tiny_llama_gguf(tmp / "tiny.gguf", build_tiny_llama(vocab_size=tiny_vocab_size()))
    path.write_bytes(cut(path.read_bytes()))
    return str(path)


def _hf_dir(tmp: Path, truncate: bool) -> str:
    d = tmp / ("truncated" if truncate else "no-tokenizer")
    build_tiny_llama().save_pretrained(d)
    if truncate:
        w = d / "model.safetensors"
        w.write_bytes(w.read_bytes()[:5000])
    return str(d)


def _file(tmp: Path, name: str, data: bytes) -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


# case → (args given tmp_path, words the one-line error must contain)
CASES: dict[str, tuple[Callable[[Path], list[str]], tuple[str, ...]]] = {
    # 1. models that resolve to nothing; nothing is downloaded
    "model unknown": (lambda t: ["--model", "nosuch-model"], ("unknown model 'nosuch-model'", "pass one of")),
    "model path missing": (
        lambda t: ["--model", str(t / "gone" / "model")],
        ("gone/model", "does not exist"),
    ),
    "gguf path missing": (lambda t: ["--model", str(t / "x.gguf")], ("x.gguf", "does not exist")),
    "hub id not cached": (
        lambda t: ["--model", "lcc-test-org/not-cached"],
        ("lcc-test-org/not-cached", "never downloads", "huggingface-cli download"),
    ),
    # 2. corrupt model files, missing tokenizer
    "gguf truncated": (
        lambda t: ["--model", _gguf(t, lambda b: b[: len(b) // 2])],
        ("tiny.gguf", "corrupt, truncated"),
    ),
    "gguf bad magic": (lambda t: ["--model", _gguf(t, lambda b: b"GGML" + b[4:])], ("not a GGUF file",)),
    "safetensors truncated": (lambda t: ["--model", _hf_dir(t, True)], ("truncated", "could not be loaded")),
    "tokenizer missing": (lambda t: ["--model", _hf_dir(t, False)], ("no-tokenizer", "tokenizer")),
    # 3. corpora
    "corpus missing": (lambda t: ["--corpus", str(t / "none.txt")], ("none.txt", "does not exist")),
    "corpus empty": (lambda t: ["--corpus", _file(t, "e.txt", b" \n\n ")], ("e.txt", "is empty")),
    "corpus not UTF-8": (
        lambda t: ["--corpus", _file(t, "l1.txt", "caf\xe9 ".encode("latin-1") * 99)],
        ("l1.txt", "not UTF-8", "iconv"),
    ),
    "jsonl without text field": (
        lambda t: ["--corpus", _file(t, "c.jsonl", b'{"text": "ok"}\n{"body": "x"}\n')],
        ("c.jsonl", "line 2", "no string field 'text'", "--text-field"),
    ),
    "jsonl line not JSON": (
        lambda t: ["--corpus", _file(t, "d.jsonl", b'{"text": "ok"}\n{oops\n')],
        ("d.jsonl", "line 2", "not valid JSON"),
    ),
    "corpus too short": (
        lambda t: ["--corpus", _file(t, "s.txt", b"x" * 300), "--samples", "3", "--lengths", "128"],
        ("300 tokens", "enough for 2", "but 3 were requested", "fewer samples"),
    ),
    # 4. lengths
    "length zero": (lambda t: ["--lengths", "0,64"], ("context length 0 must be positive",)),
    "length negative": (lambda t: ["--lengths=-64"], ("context length -64 must be positive",)),
    "length not an integer": (lambda t: ["--lengths", "64,1.5"], ("'1.5' is not an integer",)),
    "length a word": (lambda t: ["--lengths", "64,long"], ("'long' is not an integer",)),
    "length duplicated": (lambda t: ["--lengths", "64,128,64"], ("[64] given more than once",)),
    "length empty item": (lambda t: ["--lengths", "64,,128"], ("'' is not an integer",)),
    "length beyond max positions": (
        lambda t: ["--lengths", "64,5000"],
        ("[5000] exceed tiny-llama's maximum of 4096 positions", "--allow-extrapolation"),
    ),
    # 5. method ids
    "method unknown": (
        lambda t: ["--method", "rtn-w4-g32x"],
        ("unknown method id 'rtn-w4-g32x'", "did you mean", "rtn-w{bits}-g{group}", "lcc methods"),
    ),
    "method list of commas": (lambda t: ["--method", ",,"], ("--method ',,' names no method", "lcc methods")),
    "method family unknown": (
        lambda t: ["--method", "awq-w4"],
        ("unknown method id 'awq-w4'", "valid forms"),
    ),
    "bits 0": (lambda t: ["--method", "rtn-w0-g32"], ("bits=0 is out of range [2, 8]", "rtn-w{2..8}")),
    "bits 17": (lambda t: ["--method", "rtn-w17-g32"], ("bits=17 is out of range",)),
    "group not dividing width": (
        lambda t: ["--method", "rtn-w4-g48"],
        ("group size 48 does not divide the input width 64", "per-channel (g0)"),
    ),
    "sparsity 150%": (
        lambda t: ["--method", "magnitude-s150"],
        ("sparsity 150% is out of range", "0 < P < 100"),
    ),
    "N:M with N = M": (lambda t: ["--method", "wanda-4:4"], ("N=4 is out of range", "0 < N < M")),
    "N:M with N > M": (lambda t: ["--method", "wanda-4:2"], ("N=4 is out of range",)),
    # 6/7/12. methods that misbehave (registered by the `faulty` fixture)
    "method raises": (
        lambda t: ["--method", "fault-raise"],
        ("'fault-raise'", "ZeroDivisionError: kaboom in apply", "--debug"),
    ),
    "NaN weights": (lambda t: ["--method", "fault-nan"], ("non-finite", "fault-nan", "down_proj")),
    "Inf weights": (
        lambda t: ["--method", "fault-inf"],
        ("non-finite", "model.layers.1.self_attn.v_proj.weight"),
    ),
    "Inf logits": (lambda t: ["--method", "fault-inf-logits"], ("non-finite", "length 64", "position 0")),
    "OOM at every length": (
        lambda t: ["--method", "fault-oom-32"],
        ("out of memory", "at length 64", "chunk size"),
    ),
    # 13/other options
    "--json not writable": (
        lambda t: ["--json", _file(t, "blocker", b"x") + "/r.json"],
        ("--json", "blocker"),
    ),
}
if not torch.cuda.is_available():
    CASES["cuda without CUDA"] = (
        lambda t: ["--device", "cuda"],
        ("'cuda'", "CUDA is not available", "--device cpu"),
    )


@pytest.mark.usefixtures("faulty")
@pytest.mark.parametrize("case", list(CASES))
def test_cli_error_is_one_line_exit_2(case, tmp_path, capsys):
    make_args, words = CASES[case]
    rc, out, err = lcc(capsys, *make_args(tmp_path))
    assert_one_line_error(rc, err, *words)


def table_lengths(out: str) -> list[int]:
    """The lengths of the rows of the printed curve table (the first table; the Δp table follows it)."""
    first = out.split("\n\n")[0]
    return [
        int(r.split("|")[1])
        for r in first.splitlines()
        if r.startswith("|") and r.split("|")[1].strip().isdigit()
    ]


def test_cli_method_list_skips_empty_entries_and_repeats(capsys):
    rc, out, err = lcc(capsys, "--method", "rtn-w4-g32, ,rtn-w4-g32,")
    assert rc == 0, err
    assert out.count("method rtn-w4-g32,") == 1  # measured once, as --lcc-methods does
    assert table_lengths(out) == [64]


def test_unknown_method_suggests_each_id_once(capsys):
    rc, out, err = lcc(capsys, "--method", "nonee")
    line = assert_one_line_error(rc, err, "did you mean none?")
    assert "none, none" not in line


def test_allow_extrapolation_measures_beyond_max_positions(capsys):
    rc, out, err = lcc(capsys, "--lengths", "64,4100", "--allow-extrapolation")
    assert rc == 0, err
    assert table_lengths(out) == [64, 4100]


@pytest.mark.parametrize(
    "opt,value", [("--samples", "0"), ("--samples", "two"), ("--chunk-size", "-1"), ("--calib-length", "0")]
)
def test_cli_bad_counts_are_usage_errors(opt, value, capsys):
    with pytest.raises(SystemExit) as ei:
        main([*BASE, opt, value])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and f"argument {opt}:" in err and "Traceback" not in err


@pytest.mark.usefixtures("faulty")
@pytest.mark.parametrize("method", ["fault-oom-128", "fault-cpuoom-128"])
def test_cli_oom_at_long_length_reports_the_lengths_that_fit(method, capsys):
    rc, out, err = lcc(capsys, "--method", method, "--lengths", "64,128,256", "--samples", "2")
    line = assert_one_line_error(
        rc, err, f"out of memory measuring '{method}' at length 256", "drop 256", "chunk size"
    )
    assert "Traceback" not in line
    assert table_lengths(out) == [64, 128]  # the lengths that fit were measured and printed


@pytest.mark.usefixtures("faulty")
def test_cli_debug_shows_the_traceback():
    with pytest.raises(MethodRunError, match="kaboom") as ei:
        main(["--debug", *BASE, "--method", "fault-raise"])
    assert isinstance(ei.value.__cause__, ZeroDivisionError)
    with pytest.raises(MethodRunError):  # --debug after the subcommand works too
        main([*BASE, "--method", "fault-raise", "--debug"])


def test_cli_json_is_complete(tmp_path, capsys):
    rc, out, err = lcc(capsys, "--json", str(tmp_path / "r" / "x.json"))
    assert rc == 0, err
    assert json.loads((tmp_path / "r" / "x.json").read_text())["method"] == "rtn-w4-g32"
