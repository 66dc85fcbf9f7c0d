"""`lcc measure --compressed PATH`: a compressed checkpoint measured as the method, after its tokenizer and
architecture are checked against the reference. GGUF files are written by the test with gguf-py."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _gguf_util import tiny_vocab, tiny_vocab_size, write_tiny_llama_gguf

from lcc_harness.cli import main
from lcc_harness.engines.torch.checkpoint import architecture_mismatch, tokenizer_mismatch
from lcc_harness.methods import CompressContext, parse_method
from lcc_harness.models.load import build_tiny_llama

pytestmark = pytest.mark.usefixtures("offline")  # every test: no network, empty HF cache (conftest)

TEXT = "the cat and the hat sat on the mat; then they went in, and the rest is history. " * 60


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference as an F32 GGUF, its Q8_0 GGUF, mismatching GGUFs and a corpus."""
    d = tmp_path_factory.mktemp("checkpoints")
    model = build_tiny_llama(vocab_size=tiny_vocab_size()).eval()
    tokens, types, merges = tiny_vocab()
    other = list(tokens)
    other[256], other[257] = (
        other[257],
        other[256],
    )  # two merge tokens swap ids: same size, another vocabulary
    out = {
        "ref": write_tiny_llama_gguf(d / "ref.gguf", model),
        "q8": write_tiny_llama_gguf(d / "ref-q8_0.gguf", model, linear_qtype="Q8_0"),
        "vocab": write_tiny_llama_gguf(d / "vocab.gguf", model, vocab=(other, types, merges)),
        "arch": write_tiny_llama_gguf(
            d / "arch.gguf", build_tiny_llama(vocab_size=tiny_vocab_size(), intermediate_size=96)
        ),
        "corpus": d / "corpus.txt",
    }
    out["corpus"].write_text(TEXT)
    return out


def measure(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp: Path, *what: str) -> dict:
    """Run `lcc measure` on the reference GGUF; the --json result."""
    out = tmp / f"r{len(list(tmp.glob('r*.json')))}.json"
    args = ["measure", "--model", str(files["ref"]), *what, "--lengths", "32,64", "--samples", "2"]
    args += ["--corpus", str(files["corpus"]), "--device", "cpu", "--quiet", "--no-cache", "--json", str(out)]
    args += ["--reverse-kl"]  # the checkpoint must match the method on the informational statistics too
    capsys.readouterr()
    rc = main(args)
    assert rc == 0, capsys.readouterr().err
    return json.loads(out.read_text())


def test_a_q8_0_gguf_measures_like_the_gguf_q8_0_method(files, tmp_path, capsys):
    method = measure(capsys, files, tmp_path, "--method", "gguf-q8_0")
    ckpt = measure(capsys, files, tmp_path, "--compressed", str(files["q8"]))
    assert ckpt["method"] == "ref-q8_0.gguf" and ckpt["method_info"]["compressed"] == str(
        files["q8"].resolve()
    )
    for L in ("32", "64"):
        a, b = method["curves"][L], ckpt["curves"][L]
        assert a["window_kl"] > 1e-4  # not a comparison between zeros
        assert b["window_kl"] == pytest.approx(a["window_kl"], rel=1e-6)
        assert b["per_sample"]["window_kl"] == pytest.approx(a["per_sample"]["window_kl"], rel=1e-6)
        assert b["reverse_kl"] == pytest.approx(a["reverse_kl"], rel=1e-6)


@pytest.mark.parametrize("method_id", ["gguf-q4_0", "magnitude-s50"], ids=["quantized", "pruned"])
def test_an_hf_directory_measures_like_the_method(files, tmp_path, capsys, method_id):
    """Reference and checkpoint as Hugging Face folders (a GGUF-loaded model cannot be saved by transformers): a
    quantized and a pruned model's safetensors."""
    from test_models import hf_tokenizer

    source = build_tiny_llama(vocab_size=tiny_vocab_size()).eval()
    dirs = {"ref": tmp_path / "ref-hf", "cmp": tmp_path / "cmp-hf"}
    compressed = parse_method(method_id).apply(copy.deepcopy(source), CompressContext())
    for key, model in (("ref", source), ("cmp", compressed)):
        model.save_pretrained(dirs[key])
        hf_tokenizer().save_pretrained(dirs[key])
    hf = {**files, "ref": dirs["ref"]}
    method = measure(capsys, hf, tmp_path, "--method", method_id)
    ckpt = measure(capsys, hf, tmp_path, "--compressed", str(dirs["cmp"]), "--name", "mine")
    assert ckpt["method"] == "mine"
    for L in ("32", "64"):
        assert method["curves"][L]["window_kl"] > 1e-3
        assert ckpt["curves"][L]["window_kl"] == pytest.approx(method["curves"][L]["window_kl"], rel=1e-6)


def test_a_checkpoint_saved_by_torchao_through_transformers_measures_like_the_adapter(
    files, tmp_path, capsys
):
    """A checkpoint quantized and saved by a library (transformers' TorchAoConfig, int8 weight-only; loaded back
    with its Int8Tensor weights, so it runs torchao's own forward) against the adapter family in its kernel mode."""
    pytest.importorskip("torchao")
    from test_models import hf_tokenizer
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    ref, q = tmp_path / "ref-hf", tmp_path / "torchao-int8"
    build_tiny_llama(vocab_size=tiny_vocab_size()).eval().save_pretrained(ref)
    hf_tokenizer().save_pretrained(ref)
    cfg = TorchAoConfig(Int8WeightOnlyConfig())
    model = AutoModelForCausalLM.from_pretrained(ref, quantization_config=cfg, dtype=torch.float32)
    model.save_pretrained(q, safe_serialization=False)
    hf_tokenizer().save_pretrained(q)
    hf = {**files, "ref": ref}
    method = measure(capsys, hf, tmp_path, "--method", "torchao-int8wo-kernel")
    ckpt = measure(capsys, hf, tmp_path, "--compressed", str(q))
    for L in ("32", "64"):
        assert method["curves"][L]["window_kl"] > 1e-6
        assert ckpt["curves"][L]["window_kl"] == pytest.approx(method["curves"][L]["window_kl"], rel=1e-5)


def test_the_reference_itself_gives_zero(files, tmp_path, capsys):
    r = measure(capsys, files, tmp_path, "--compressed", str(files["ref"]), "--name", "self")
    for c in r["curves"].values():
        assert c["window_kl"] == 0.0 and c["reverse_kl"] == 0.0 and c["top1"] == 1.0


@pytest.mark.parametrize(
    "case,words",
    [
        ("vocab", ("tokenizer: vocabulary differs: token id 256 is 'he', in the reference 'Ġt'",)),
        ("arch", ("architecture: config intermediate_size = 96, in the reference 128",)),
    ],
)
def test_a_mismatching_checkpoint_is_a_one_line_error(files, capsys, case, words):
    capsys.readouterr()
    rc = main(["measure", "--model", str(files["ref"]), "--compressed", str(files[case]), "--lengths", "32",
               "--samples", "1", "--corpus", str(files["corpus"]), "--device", "cpu", "--quiet", "--no-cache"])  # fmt: skip
    # transformers' GGUF loading bars (\r-separated segments) are not ours to silence
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and not x.startswith("Converting")]
    assert rc == 2 and len(err) == 1 and err[0].startswith("lcc: error: compressed model '"), err
    assert f"does not match the reference '{files['ref']}'" in err[0]
    for w in words:
        assert w in err[0], err[0]


@pytest.mark.parametrize(
    "args,code",
    [
        (["--method", "none", "--compressed", "x.gguf"], "not allowed with argument"),
        ([], "one of the arguments --method --compressed is required"),
    ],
)
def test_method_or_compressed_exactly_one(args, code, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["measure", "--model", "tiny-llama", *args])
    assert ei.value.code == 2 and code in capsys.readouterr().err


def test_name_without_compressed_is_an_error(capsys):
    rc = main(
        ["measure", "--model", "tiny-llama", "--method", "none", "--name", "x", "--quiet", "--no-cache"]
    )
    assert rc == 2 and "--name names a --compressed checkpoint" in capsys.readouterr().err


# ---- the checks themselves -----------------------------------------------------------------------------------
def _tok(vocab: dict[str, int], **special: object) -> SimpleNamespace:
    every = list(dict.fromkeys(v for k, v in special.items() if not k.endswith("_id")))
    return SimpleNamespace(
        get_vocab=lambda: dict(vocab),
        all_special_tokens=every,
        all_special_ids=[vocab[t] for t in every],
        **special,
    )


def test_tokenizer_mismatch_names_what_differs():
    v = {"a": 0, "b": 1, "<s>": 2, "</s>": 3}
    ref = _tok(v, bos_token="<s>", bos_token_id=2, eos_token="</s>", eos_token_id=3)
    assert (
        tokenizer_mismatch(ref, _tok(v, bos_token="<s>", bos_token_id=2, eos_token="</s>", eos_token_id=3))
        is None
    )
    assert tokenizer_mismatch(ref, _tok({**v, "c": 4})) == "vocabulary of 5 tokens, the reference's has 4"
    swapped = _tok(v, bos_token="</s>", bos_token_id=3, eos_token="</s>", eos_token_id=3)
    assert tokenizer_mismatch(ref, swapped) == (
        "special tokens differ: bos_token is ['</s>', 3], in the reference ['<s>', 2]"
    )
    eos_only = _tok(
        v, bos_token="<s>", bos_token_id=2, eos_token="</s>", eos_token_id=3, pad_token="a", pad_token_id=0
    )
    assert (
        tokenizer_mismatch(ref, eos_only)
        == "special tokens differ: pad_token is ['a', 0], in the reference None"
    )


def test_architecture_mismatch_names_the_parameter():
    a = build_tiny_llama()
    assert architecture_mismatch(a, build_tiny_llama(seed=1)) is None  # other weights, same model
    b = build_tiny_llama()
    b.model.layers[1].mlp.up_proj = torch.nn.Linear(64, 96, bias=False)
    assert architecture_mismatch(a, b) == (
        "parameter model.layers.1.mlp.up_proj.weight has shape (96, 64), in the reference (128, 64)"
    )
    c = build_tiny_llama(num_hidden_layers=3)
    assert architecture_mismatch(a, c) == "config num_hidden_layers = 3, in the reference 2"


# ---- under pytest: --lcc-compressed NAME=PATH ---------------------------------------------------------------------
@pytest.mark.slow
def test_a_checkpoint_under_pytest_is_gated_and_a_changed_file_is_never_compared(files, project, tmp_path):
    ckpt = tmp_path / "mine.gguf"
    ckpt.write_bytes(files["q8"].read_bytes())
    common = ["-p", "no:cacheprovider", "-q", "-rfE", "--lcc-model", str(files["ref"]), "--lcc-corpus"]
    common += [str(files["corpus"]), "--lcc-lengths", "32,64", "--lcc-samples", "2", "test_kl_regression.py"]
    r = project.runpytest_subprocess(*common, "--lcc-compressed", f"mine={ckpt}", "--lcc-update-baselines")
    r.assert_outcomes(passed=3)  # 2 lengths + growth, and no profile method (--lcc-methods not given)
    (base,) = (project.path / "baselines").glob("*.json")
    entry = json.loads(base.read_text())["methods"]["mine"]
    assert entry["method_info"]["compressed_sha256"] and list(json.loads(base.read_text())["methods"]) == [
        "mine"
    ]
    r = project.runpytest_subprocess(*common, "--lcc-compressed", f"mine={ckpt}")
    r.assert_outcomes(passed=3)
    ckpt.write_bytes(files["ref"].read_bytes())  # another file under the same name
    r = project.runpytest_subprocess(*common, "--lcc-compressed", f"mine={ckpt}")
    r.assert_outcomes(failed=3)
    assert (
        "checkpoint 'mine' (" in r.stdout.str()
        and "is not the file its baseline was measured on" in r.stdout.str()
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "value,message",
    [
        ("rtn-w4-g32={p}", "is a method id; give the checkpoint another name"),
        ("x=", "has no path; write NAME=PATH"),
        ("two words={p}", "must be one word"),
    ],
)
def test_bad_compressed_option_is_a_usage_error(files, project, value, message):
    r = project.runpytest_subprocess(
        "-p", "no:cacheprovider", "--lcc-compressed", value.format(p=files["q8"])
    )
    assert r.ret == pytest.ExitCode.USAGE_ERROR and message in r.stderr.str(), r.stderr.str()
