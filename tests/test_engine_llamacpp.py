"""The llama.cpp engine: one pass through llama.cpp's own kernels, GGUF and KV-cache types as methods, the engine
floor, the statistics block, --compressed and --kld-base files. Fast cases run on a tiny random Llama written as
a GGUF (head size 64, rows of 256: every KV and k-quant type applies); the engine agreement runs on SmolLM2."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _gguf_util import tiny_vocab_size, write_tiny_llama_gguf

from lcc_harness.engines.results import RunConfig
from lcc_harness.errors import CheckpointError, HarnessError, MethodError
from lcc_harness.models.load import build_tiny_llama

ll = pytest.importorskip(
    "llama_cpp", reason="the llama.cpp engine needs llama-cpp-python (make setup installs it)"
)

from lcc_harness.engines.llamacpp.gguf_files import EngineError  # noqa: E402
from lcc_harness.engines.llamacpp.harness import LlamaCppHarness, torch_agreement  # noqa: E402
from lcc_harness.engines.llamacpp.kld_base import (  # noqa: E402
    KldBaseError,
    engine_chunk_kld,
    measure_kld_base,
    read_kld_base,
)

LENGTHS = (64, 128, 256)


def test_llama_cpp_is_built_without_amx() -> None:
    """`make setup` builds llama.cpp without Intel AMX (Makefile, LLAMA_CFLAGS): on these machines its AMX matmul
    dies with SIGILL, taking the test worker with it, and AMX kernels would tie the engine's numbers to the host."""
    info = ll.llama_print_system_info().decode()
    assert "AMX_INT8 = 1" not in info, (
        "llama-cpp-python was built with AMX kernels; rebuild it without: "
        ".venv/bin/pip uninstall -y llama-cpp-python && make setup"
    )


# the torch and llama.cpp references of SmolLM2 at F32 (README, "Measure through llama.cpp": 5e-7 nats measured
# at 256…1024, largest position 2e-5): a bound 20× above the measured window KL
AGREEMENT_BOUND = 1e-5


def _tiny_gguf(path: Path, seed: int = 7, **over) -> Path:
    cfg = dict(
        vocab_size=tiny_vocab_size(),
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
    )
    return write_tiny_llama_gguf(path, build_tiny_llama(seed, **{**cfg, **over}).eval())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small English corpus (the Python reference topics), so the tiny vocabulary tokenizes it in a moment."""
    from pydoc_data.topics import topics

    p = tmp_path_factory.mktemp("corpus") / "text.txt"
    p.write_text("\n\n".join(topics[k] for k in sorted(topics))[:400_000])
    return p


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return _tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def h(tiny_gguf, corpus, tmp_path_factory) -> LlamaCppHarness:
    cfg = RunConfig(
        model=str(tiny_gguf),
        engine="llama.cpp",
        lengths=LENGTHS,
        samples=2,
        corpus=str(corpus),
        design="window",
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    harness = LlamaCppHarness(cfg)
    yield harness
    harness.close()


def _kl(res) -> list[float]:
    return [res.stats[L].window_kl for L in LENGTHS]


def test_none_is_exactly_zero_and_one_pass_is_sound(h):
    res = h.run("none", noise_probe=True)
    assert all(v == 0.0 for v in _kl(res))
    probe = res.info["method_info"]["length_probe"]
    assert probe["absolute"] == 0.0 and probe["samples"] == 2  # a pass of 64 tokens alone = the prefix of 256
    assert res.mode == "one-pass" and res.info["engine"] == "llama.cpp"


def test_micro_batch_shrinks_with_vocabulary_and_context():
    from lcc_harness.engines.llamacpp.binding import micro_batch

    # SmolLM2 up to 2048 positions: llama.cpp's default
    assert micro_batch(49152, 1024) == micro_batch(49152, 2048) == 512
    assert (micro_batch(49152, 4096), micro_batch(49152, 8192)) == (256, 128)
    assert (micro_batch(262144, 2048), micro_batch(262144, 8192)) == (128, 128)  # Gemma 3: the logits bound
    assert micro_batch(262144, 32768) == micro_batch(10**9, 10**9) == 64  # never below MIN_BATCH


def test_the_micro_batch_changes_no_number(h):
    """A second harness whose contexts run micro-batches of MIN_BATCH (64) positions instead of the default: every
    window KL is bit-identical (what lets the micro-batch shrink at long contexts to save memory; at 32 it is not:
    llama.cpp's CPU kernels take other paths, and KL moves by up to 9 % here)."""
    from lcc_harness.engines.llamacpp.binding import MIN_BATCH

    default = {m: h.run(m).stats for m in ("kv-q8_0", "gguf-q8_0")}
    h64 = LlamaCppHarness(h.cfg)
    try:
        assert h64.n_batch == h.n_batch > MIN_BATCH
        h64.n_batch = MIN_BATCH  # before any context exists: the reference and the method's alike
        small = {m: h64.run(m).stats for m in default}
    finally:
        h64.close()
    for m, stats in default.items():
        for L in LENGTHS:
            assert small[m][L].per_sample["window_kl"] == stats[L].per_sample["window_kl"], (m, L)


def test_kv_types_order_above_the_engine_floor(h):
    q8, q4 = _kl(h.run("kv-q8_0")), _kl(h.run("kv-q4_0"))
    floor = h.engine_floor()
    flash = [floor["flash_off"][str(L)]["window_kl"] for L in LENGTHS]
    for a, b, f in zip(q4, q8, flash, strict=True):
        assert a > b > f >= 0.0 and math.isfinite(a)
    noise = h.self_noise()  # the gate's float-noise input: the largest per-sample KL of any floor variant
    assert noise == max(v["max_sample"] for per in floor.values() for v in per.values())
    assert math.isfinite(noise) and noise >= 0.0


def test_k_and_v_types_apart_and_composite(h):
    k8v4 = _kl(h.run("kv-k8_0-v4_0"))
    q8 = _kl(h.run("kv-q8_0"))
    assert all(a > b for a, b in zip(k8v4, q8, strict=True))  # a 4-bit V cache costs more than 8-bit
    both = h.run("gguf-q4_k_m+kv-q4_0")
    assert both.info["method_info"]["kv_cache"] == {"type_k": "q4_0", "type_v": "q4_0"}
    assert both.info["method_info"]["gguf_type"] == "Q4_K_M"


def test_gguf_types_order(h):
    q8, q4, q2 = (_kl(h.run(m)) for m in ("gguf-q8_0", "gguf-q4_0", "gguf-q2_k"))
    for a, b, c in zip(q2, q4, q8, strict=True):
        assert a > b > c > 0.0


def test_statistics_block_on_every_length(h):
    res = h.run("gguf-q4_0")
    for L in LENGTHS:
        s = res.stats[L].stats
        assert set(s) == {"kld", "delta_p", "same_top_p", "ppl_ratio"}
        k = s["kld"]
        assert set(k) == {
            "mean",
            "se",
            "max",
            "p99.9",
            "p99",
            "p95",
            "p90",
            "median",
            "p10",
            "p5",
            "p1",
            "p0.1",
            "min",
        }
        assert k["min"] <= k["p1"] <= k["median"] <= k["p99"] <= k["max"]
        assert k["mean"] == pytest.approx(res.stats[L].window_kl, rel=1e-9)
        assert {"rms", "rms_se"} <= set(s["delta_p"]) and 0 < s["same_top_p"]["mean"] <= 1
        assert s["ppl_ratio"] == pytest.approx(math.exp(res.stats[L].dnll), rel=1e-9)


def test_torch_methods_are_refused_in_one_line(h):
    with pytest.raises(MethodError, match=r"torch engine only.*--engine torch") as exc:
        h.run("rtn-w4-g64")
    assert "\n" not in str(exc.value)


def test_imatrix_types_need_one(h):
    with pytest.raises(MethodError, match="--imatrix"):
        h.run("gguf-iq2_xs")


def test_compressed_gguf_of_another_vocabulary_or_architecture(h, tmp_path):
    from _gguf_util import tiny_vocab

    toks, types, merges = tiny_vocab()
    other = dict(vocab_size=len(toks) + 1)
    model = build_tiny_llama(
        3, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, **other
    )
    path = write_tiny_llama_gguf(
        tmp_path / "other.gguf", model, vocab=(toks + ["<|x|>"], types + [3], merges)
    )
    with pytest.raises(CheckpointError, match="vocabulary size") as exc:
        h.run_checkpoint_file(path, "other")
    assert "\n" not in str(exc.value)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(HarnessError, match="not a GGUF file"):
        h.run_checkpoint_file(fake, "fake")
    same = h.run_checkpoint_file(h.ref_path, "same")  # the reference itself: KL 0
    assert all(v == 0.0 for v in _kl(same))


def test_truncated_gguf_is_one_line(h, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(h.ref_path.read_bytes()[:5000])
    with pytest.raises(HarnessError) as exc:
        h.run_checkpoint_file(bad, "cut")
    assert "\n" not in str(exc.value) and "cut.gguf" in str(exc.value)


def test_design_and_anatomy_are_refused(tiny_gguf, corpus):
    base = RunConfig(model=str(tiny_gguf), engine="llama.cpp", lengths=LENGTHS, corpus=str(corpus))
    with pytest.raises(HarnessError, match="window curves only"):
        LlamaCppHarness(dataclasses.replace(base, design="both"))
    with pytest.raises(HarnessError, match="--anatomy"):
        LlamaCppHarness(dataclasses.replace(base, design="window", anatomy=1))


def test_a_missing_binding_names_the_install_command(monkeypatch):
    import lcc_harness.engines.llamacpp.binding as eng

    monkeypatch.setattr(eng, "_LL", None)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import raises ImportError
    with pytest.raises(EngineError, match=r"pip install 'lcc-harness\[llamacpp\]'"):
        eng.binding()


# ---- llama-perplexity's KL-divergence base files ----------------------------------------------------------
def _write_base(path: Path, tokens: np.ndarray, logits_per_chunk: list[np.ndarray], n_vocab: int) -> None:
    """A base file as llama-perplexity writes it (its log_softmax with 16-bit quantized log-probabilities)."""
    n_chunk, n_ctx = tokens.shape
    nv = 2 * ((n_vocab + 1) // 2) + 4
    with open(path, "wb") as f:
        f.write(b"_logits_")
        f.write(np.uint32(n_ctx).tobytes() + np.int32(n_vocab).tobytes() + np.int32(n_chunk).tobytes())
        f.write(tokens.astype("<i4").tobytes())
        for z in logits_per_chunk:  # (n_ctx − 1 − n_ctx/2, V) float32
            rows = np.zeros((z.shape[0], nv), dtype="<u2")
            mx, mn = z.max(1), np.maximum(z.min(1), z.max(1) - 16)
            lse = np.log(np.exp(z - mx[:, None]).sum(1))
            scale = ((mx - mn) / 65535).astype(np.float32)
            head = np.stack([scale, (mn - mx - lse).astype(np.float32)], 1).astype("<f4")
            rows[:, :4] = head.view("<u2")
            q = np.where(z > mn[:, None], np.rint((z - mn[:, None]) / scale[:, None]), 0)
            rows[:, 4 : 4 + n_vocab] = q.astype("<u2")
            f.write(rows.tobytes())


def test_kld_base_reproduces_the_engine_and_reports_a_position_curve(h, tmp_path):
    from lcc_harness.engines.llamacpp.binding import Context, ContextSpec, GGUFModel

    n_ctx, n_chunk = 128, 3
    tokens = np.stack(
        [s.ids[:n_ctx].numpy() for s in h.samples] + [h.samples[0].ids[n_ctx : 2 * n_ctx].numpy()]
    )[:n_chunk]
    ref = Context(GGUFModel(h.ref_path), ContextSpec(n_ctx, "f16", "f16", True, n_ctx, n_ctx, 2))
    chunks = []
    for row in tokens:
        z = torch.cat([b.clone() for _, b in ref.logit_blocks(torch.from_numpy(row.astype(np.int64)))])
        chunks.append(z[n_ctx // 2 : n_ctx - 1].numpy())
    ref.close()
    path = tmp_path / "base.kld"
    _write_base(path, tokens, chunks, h.ref_model.n_vocab)
    q4 = h._compressed_model(
        __import__("lcc_harness.methods", fromlist=["parse_method"]).parse_method("gguf-q4_0")
    )[0]
    out = measure_kld_base(read_kld_base(path), q4.path, threads=2)
    direct = engine_chunk_kld(tokens, h.ref_path, q4.path, kv="f16", threads=2)
    q4.close()
    # the same KL but for the base file's 16-bit log-probabilities and e^-16 cut-off (within 0.5 %)
    assert out["stats"]["kld"]["mean"] == pytest.approx(direct["mean_kld"], rel=5e-3)
    assert out["n_chunk"] == 3 and out["scored_per_chunk"] == n_ctx - 1 - n_ctx // 2
    assert len(out["position_curve"]) == out["scored_per_chunk"]


def test_kld_base_files_that_are_not_one(tmp_path):
    cases = {
        "short.kld": b"_logits_",
        "foreign.kld": b"GGUF" + b"\0" * 100,
        "truncated.kld": b"_logits_"
        + np.uint32(64).tobytes()
        + np.int32(10).tobytes()
        + np.int32(2).tobytes()
        + b"\0" * 40,
        "huge.kld": b"_logits_" + np.uint32(2**31).tobytes() + np.int32(10).tobytes() + np.int32(2).tobytes(),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(KldBaseError) as exc:
            read_kld_base(tmp_path / name)
        assert "\n" not in str(exc.value) and name in str(exc.value)
    with pytest.raises(KldBaseError, match="directory"):
        read_kld_base(tmp_path)
    import os

    fifo = tmp_path / "fifo.kld"
    os.mkfifo(fifo)
    with pytest.raises(KldBaseError, match="not a regular file"):  # never opened: would block
        read_kld_base(fifo)


# ---- the two engines, on the embedded model -------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> LlamaCppHarness:
    cfg = RunConfig(
        engine="llama.cpp",
        lengths=(128, 256),
        samples=2,
        design="window",
        cache_dir=str(tmp_path_factory.mktemp("smol-cache")),
    )
    harness = LlamaCppHarness(cfg)
    yield harness
    harness.close()


@pytest.mark.slow  # a long run (about a minute on 2 cores)
def test_torch_and_llama_cpp_references_agree_at_f32(smollm2):
    agree = torch_agreement(smollm2)
    for L, v in agree.items():
        assert 0.0 <= v["window_kl"] < AGREEMENT_BOUND, (L, v)
        assert v["max_position_kl"] < 100 * AGREEMENT_BOUND, (L, v)


@pytest.mark.slow
def test_cli_measures_several_methods_and_one_failure_does_not_stop_the_rest(tiny_gguf, corpus, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lcc_harness.cli", "measure", "--engine", "llama.cpp", "--model", str(tiny_gguf),
         "--method", "kv-q8_0,rtn-w4-g64,gguf-q4_0", "--lengths", "64,128", "--corpus", str(corpus),
         "--cache-dir", str(tmp_path / "c"), "--quiet", "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert (
        "method kv-q8_0" in out.stdout and "method gguf-q4_0" in out.stdout and "mean KLD ± SE" in out.stdout
    )
    assert "engine floor" in out.stdout
    err = [line for line in out.stderr.splitlines() if line.startswith("lcc: error")]
    assert len(err) == 1 and "rtn-w4-g64" in err[0] and "torch engine only" in err[0]
    import json

    rec = json.loads((tmp_path / "r.json").read_text())
    assert [m["method"] for m in rec["methods"]] == ["kv-q8_0", "gguf-q4_0"]
    assert "stats" in rec["methods"][0]["curves"]["128"] and "engine_floor" in rec["methods"][0]


@pytest.mark.gpu
def test_gpu_offload_matches_cpu(tiny_gguf, corpus, tmp_path):
    if not ll.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python has no GPU backend (build it with CMAKE_ARGS=-DGGML_CUDA=on)")
    base = dict(
        model=str(tiny_gguf), engine="llama.cpp", lengths=(64, 128), corpus=str(corpus), design="window"
    )
    cpu = LlamaCppHarness(RunConfig(**base, device="cpu", cache_dir=str(tmp_path)))
    gpu = LlamaCppHarness(RunConfig(**base, device="cuda", cache_dir=str(tmp_path)))
    a, b = cpu.run("kv-q8_0"), gpu.run("kv-q8_0")
    assert gpu.lm.device_type == "cuda" and gpu.n_gpu_layers > 0
    for L in (64, 128):
        assert b.stats[L].window_kl == pytest.approx(a.stats[L].window_kl, rel=0.2)


def _legacy_imatrix(path: Path, widths: dict[str, int]) -> Path:
    """An importance matrix in llama-imatrix's legacy layout (n; per entry: name, ncall, nval, values)."""
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(np.int32(len(widths)).tobytes())
        for name, n in widths.items():
            f.write(np.int32(len(name)).tobytes() + name.encode())
            f.write(np.int32(4).tobytes() + np.int32(n).tobytes())
            f.write((4 * rng.uniform(0.5, 2.0, n)).astype("<f4").tobytes())
    return path


def test_an_importance_matrix_makes_the_types_that_need_one(tiny_gguf, corpus, tmp_path):
    from lcc_harness.engines.llamacpp.gguf_files import load_imatrix

    widths = {}
    for i in range(2):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            widths[f"blk.{i}.{t}.weight"] = 256
        widths[f"blk.{i}.ffn_down.weight"] = 512
    imx = _legacy_imatrix(tmp_path / "imatrix.dat", widths)
    loaded = load_imatrix(imx)
    assert set(loaded) == set(widths) and all(v.size == widths[k] for k, v in loaded.items())
    cfg = RunConfig(
        model=str(tiny_gguf), engine="llama.cpp", lengths=(64, 128), corpus=str(corpus), design="window",
        imatrix=str(imx), cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    h2 = LlamaCppHarness(cfg)
    res = h2.run("gguf-iq2_xs")
    assert res.info["method_info"]["imatrix"] == str(imx)
    assert all(res.stats[L].window_kl > 0 for L in (64, 128))
    h2.close()
    (tmp_path / "bad.dat").write_bytes(b"\x05\x00\x00\x00abc")
    with pytest.raises(EngineError, match="neither a GGUF imatrix nor a legacy"):
        load_imatrix(tmp_path / "bad.dat")


# ---- the pytest plugin with --lcc-engine llama.cpp ---------------------------------------------------------
@pytest.mark.slow
def test_plugin_gates_llama_cpp_methods_against_their_own_baseline(project, tiny_gguf, corpus):
    """Update, rerun (passes), a baseline lowered by 3 % (fails every length): the same gate as torch's, in a
    baseline file of its own; the claims skip (they need the torch engine's matched curves)."""
    import json

    args = [  # paths as --opt=PATH: a bare path argument would move pytest's rootdir away from the project
        "-p", "no:cacheprovider", "-q", "-rfE", "--lcc-engine", "llama.cpp", f"--lcc-model={tiny_gguf}",
        f"--lcc-corpus={corpus}", "--lcc-methods", "kv-q4_0,gguf-q4_0", "--lcc-lengths", "64,128",
        "--lcc-samples", "2", "--lcc-design", "window",
    ]  # fmt: skip
    r = project.runpytest_subprocess(*args, "--lcc-update-baselines")
    r.assert_outcomes(passed=6, skipped=4)
    files = list((project.path / "baselines").glob("*.json"))
    assert [f.name for f in files] == ["tiny.gguf.float32.cpu.llama.cpp.smoke.json"], files
    data = json.loads(files[0].read_text())
    assert data["engine"] == "llama.cpp" and sorted(data["methods"]) == ["gguf-q4_0", "kv-q4_0"]
    r = project.runpytest_subprocess(*args)
    r.assert_outcomes(passed=6, skipped=4)
    report = (project.path / "reports" / "kl_report.md").read_text()
    assert (
        "## Engine floor" in report and "llama.cpp's statistics per length" in report and "| engine" in report
    )
    for m in data["methods"].values():
        for c in m["curves"].values():
            c["per_sample"] = [v / 1.03 for v in c["per_sample"]]
            c["window_kl"] = sum(c["per_sample"]) / len(c["per_sample"])
    files[0].write_text(json.dumps(data))
    r = project.runpytest_subprocess(*args, "-k", "test_kl_within_baseline")
    r.assert_outcomes(failed=4)
    # a torch run of the same profile reads the torch file, never this one
    r = project.runpytest_subprocess(
        "-p", "no:cacheprovider", "-q", "--lcc-methods", "rtn-w4-g32", "test_kl_regression.py"
    )
    assert "tiny.gguf.float32.cpu.llama.cpp" not in r.stdout.str()


# ---- a transformers folder as the llama.cpp engine's reference ----------------------------------------------
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, corpus) -> Path:
    """A tiny random LlamaForCausalLM saved with save_pretrained, with a byte-level BPE tokenizer trained here."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("hf-llama")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([corpus.read_text()[:200_000]], vocab_size=400, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    n = len(tok)
    model = build_tiny_llama(
        5, vocab_size=n, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
    )  # fmt: skip
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_a_transformers_folder_is_written_as_the_reference_gguf(hf_folder, corpus, tmp_path):
    cfg = RunConfig(
        model=str(hf_folder), engine="llama.cpp", lengths=(64, 128), samples=2, corpus=str(corpus),
        design="window", cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    hh = LlamaCppHarness(cfg)
    assert hh.ref_path.suffix == ".gguf" and hh.ref_path.parent.name == "llama.cpp"
    # the GGUF's tokenizer is the folder's: llama.cpp and transformers give the same ids
    from transformers import AutoTokenizer

    text = corpus.read_text()[5000:9000]
    assert hh.ref_model.encode(text) == AutoTokenizer.from_pretrained(hf_folder).encode(
        text, add_special_tokens=False
    )
    agree = torch_agreement(hh)  # the torch engine on the folder vs llama.cpp on the written GGUF
    for L, v in agree.items():
        assert v["window_kl"] < AGREEMENT_BOUND, (L, v)
    assert all(v > 0 for v in _kl_of(hh.run("gguf-q4_0"), (64, 128)))
    hh.close()


def _kl_of(res, lengths) -> list[float]:
    return [res.stats[L].window_kl for L in lengths]


def test_a_folder_of_another_architecture_is_refused_in_one_line(tmp_path, corpus):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    cfg = RunConfig(
        model=str(tmp_path), engine="llama.cpp", lengths=(64,), corpus=str(corpus), design="window"
    )
    with pytest.raises(HarnessError, match="convert_hf_to_gguf.py") as exc:
        LlamaCppHarness(cfg)
    assert "\n" not in str(exc.value)
