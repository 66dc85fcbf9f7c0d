"""GGUF files the llama.cpp engine makes and reads: the reference written at F32/F16/BF16 from a source GGUF
(gguf-py, llama.cpp's tensor names kept), quantized copies made by llama.cpp itself (`llama_model_quantize`),
importance matrices, and the checks that a file is a GGUF at all. Everything made is cached on disk under
`<cache>/llama.cpp/`, keyed by the source file's content hash, and written atomically (files.atomic_write).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from lcc_harness.errors import CheckpointError, HarnessError, ModelLoadError
from lcc_harness.files import atomic_write, entry_lock, file_sha256, read_head

# --dtype → the GGUF file type of the reference (llama_ftype: ALL_F32 0, MOSTLY_F16 1, MOSTLY_BF16 32) and the KV
# cache type the reference runs with (the uncompressed model keeps its activations at its own precision)
REFERENCE_TYPES: dict[str, tuple[str, int, str]] = {
    "float32": ("F32", 0, "f32"),
    "float16": ("F16", 1, "f16"),
    "bfloat16": ("BF16", 32, "bf16"),
}


class EngineError(HarnessError):
    """llama.cpp (or its binding) cannot do what was asked; the message names the fix."""


def check_gguf_file(path: Path, what: str) -> None:
    """One-line HarnessError unless `path` is a readable regular file that starts with the GGUF magic (never
    opens a FIFO, socket or device, which could block)."""
    _, magic = read_head(path, 4, what, ModelLoadError, "pass a .gguf file")
    if magic != b"GGUF":
        raise ModelLoadError(
            f"{what} '{path}' is not a GGUF file (bad magic {magic!r}); pass a valid .gguf file"
        )


def _reader(path: Path, what: str) -> Any:
    from gguf import GGUFReader

    check_gguf_file(path, what)
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError, struct errors, IndexError … for a damaged file
        raise ModelLoadError(
            f"{what} '{path}' could not be read as GGUF ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
            "the file is truncated or corrupt — re-download or re-export it"
        ) from None


def gguf_identity(path: Path, what: str) -> dict[str, Any]:
    """{'architecture', 'n_vocab', 'tensors'} of a GGUF file, read from its header (gguf-py)."""
    r = _reader(path, what)
    arch = r.fields.get("general.architecture")
    toks = r.fields.get("tokenizer.ggml.tokens")
    ftype = r.fields.get("general.file_type")
    return {
        "architecture": str(arch.contents()) if arch is not None else None,
        "n_vocab": len(toks.data) if toks is not None else None,
        "tensors": len(r.tensors),
        "file_type": int(ftype.contents()) if ftype is not None else None,
    }


def check_same_model(ref: Path, cmp: Path) -> None:
    """CheckpointError unless `cmp` has the reference's architecture and vocabulary (one line naming both)."""
    a, b = gguf_identity(ref, "reference GGUF"), gguf_identity(cmp, "compressed GGUF")
    for key, what in (("architecture", "architecture"), ("n_vocab", "vocabulary size")):
        if a[key] != b[key]:
            raise CheckpointError(
                f"compressed GGUF '{cmp}' has {what} {b[key]!r} but the reference has {a[key]!r}; it must be a "
                "quantization of the same model — pass the matching --model or file"
            )


def reference_gguf(source: Path, dtype: str, cache_dir: Path) -> Path:
    """The reference weights of `source` (a GGUF, possibly quantized) as a GGUF of the run's dtype: every
    quantized tensor dequantized by gguf-py — the same values transformers loads for the torch engine — and
    2-D tensors stored in F16/BF16 for those dtypes; metadata copied, file type set. Cached by content hash."""
    if dtype not in REFERENCE_TYPES:
        raise EngineError(
            f"dtype '{dtype}' has no GGUF reference type; use one of {', '.join(REFERENCE_TYPES)}"
        )
    type_name, ftype, _ = REFERENCE_TYPES[dtype]
    check_gguf_file(source, "model GGUF")
    digest = file_sha256(source)[:16]
    out = Path(cache_dir) / "llama.cpp" / f"{source.stem}-{digest}.{type_name}.gguf"
    if out.is_file():
        return out
    with entry_lock(out):  # runs sharing the cache write it once; the others wait and read it
        if not out.is_file():
            r = _reader(source, "model GGUF")
            atomic_write(out, lambda tmp: _write_reference(r, tmp, ftype, type_name))
    return out


def _write_reference(r: Any, tmp: str, ftype: int, type_name: str) -> None:
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFValueType as V
    from gguf import quants

    arch = str(r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(tmp, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            w.add_uint32(name, ftype)
            continue
        vtype = V(f.types[0])
        sub = V(f.types[-1]) if vtype == V.ARRAY and len(f.types) > 1 else None
        w.add_key_value(name, f.contents(), vtype, sub)
    if "general.file_type" not in r.fields:
        w.add_uint32("general.file_type", ftype)
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]  # numpy order (…, ne1, ne0)
        if t.tensor_type in (Q.F32, Q.F16, Q.BF16):
            arr = quants.dequantize(t.data, t.tensor_type) if t.tensor_type == Q.BF16 else np.asarray(t.data)
            arr = arr.astype(np.float32).reshape(shape)
        else:
            arr = quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        if type_name == "F16" and arr.ndim >= 2:
            w.add_tensor(t.name, arr.astype(np.float16))
        elif type_name == "BF16" and arr.ndim >= 2:
            raw = quants.quantize(arr, Q.BF16)
            w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=Q.BF16)
        else:
            w.add_tensor(t.name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load_imatrix(path: Path) -> dict[str, np.ndarray]:
    """An importance matrix as llama-quantize reads it: tensor name → mean squared activation per input column.
    GGUF format (llama-imatrix's default: '<name>.in_sum2' ÷ '<name>.counts' per expert) or the legacy .dat
    format (entries of name, ncall, values ÷ ncall)."""
    path = Path(path)
    _, magic = read_head(path, 4, "--imatrix", EngineError, "pass an imatrix file from llama-imatrix")
    if magic == b"GGUF":
        return _imatrix_gguf(path)
    return _imatrix_legacy(path)


def _imatrix_gguf(path: Path) -> dict[str, np.ndarray]:
    r = _reader(path, "--imatrix")
    by = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in r.tensors}
    out: dict[str, np.ndarray] = {}
    for name, sums in by.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = by.get(base + ".counts")
        if counts is None or counts.size == 0 or sums.size % counts.size:
            raise EngineError(
                f"--imatrix '{path}': entry '{base}' has no matching counts; regenerate it with llama-imatrix"
            )
        per = sums.reshape(counts.size, -1)
        out[base] = np.where(counts[:, None] > 0, per / np.maximum(counts[:, None], 1e-30), 1.0).reshape(-1)
    if not out:
        raise EngineError(
            f"--imatrix '{path}' holds no '<tensor>.in_sum2' entries; pass an imatrix from llama-imatrix"
        )
    return out


def _imatrix_legacy(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    bad = EngineError(
        f"--imatrix '{path}' is neither a GGUF imatrix nor a legacy .dat imatrix (truncated?); regenerate it with llama-imatrix"
    )
    pos = 0

    def i32() -> int:
        nonlocal pos
        if pos + 4 > len(data):
            raise bad
        v = int.from_bytes(data[pos : pos + 4], "little", signed=True)
        pos += 4
        return v

    n = i32()
    if not 0 < n < 1_000_000:
        raise bad
    out: dict[str, np.ndarray] = {}
    for _ in range(n):
        ln = i32()
        if not 0 < ln < 4096 or pos + ln > len(data):
            raise bad
        name = data[pos : pos + ln].decode("utf-8", errors="replace")
        pos += ln
        ncall, nval = i32(), i32()
        if nval < 1 or pos + 4 * nval > len(data):
            raise bad
        vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        out[name] = vals / ncall if ncall > 0 else vals
    return out


def quantized_gguf(
    ll: Any,
    reference: Path,
    type_name: str,
    ftype: int,
    cache_dir: Path,
    threads: int,
    imatrix: Path | None = None,
    requantize: bool = False,
    reference_digest: str | None = None,
) -> Path:
    """The reference GGUF quantized to `type_name` by llama.cpp (`llama_model_quantize`, its default k-quant
    mixes and output/embedding types, as `llama-quantize` makes them), with `imatrix` when given; `requantize`:
    the reference is itself quantized (llama-quantize --allow-requantize). Cached by the reference's content
    (`reference_digest`: its sha256 when the caller has it, so a cached file is found without reading the
    reference again)."""
    tag = f".imatrix-{file_sha256(imatrix)[:12]}" if imatrix is not None else ""
    digest = (reference_digest or file_sha256(reference))[:16]
    out = Path(cache_dir) / "llama.cpp" / f"{reference.stem}-{digest}.{type_name}{tag}.gguf"
    if out.is_file():
        return out
    params = ll.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    params.allow_requantize = requantize
    keep: list[Any] = []  # the imatrix arrays must outlive the call
    if imatrix is not None:
        entries = load_imatrix(imatrix)
        arr = (ll.llama_model_imatrix_data * (len(entries) + 1))()
        for k, (name, vals) in enumerate(entries.items()):
            buf = np.ascontiguousarray(vals, dtype=np.float32)
            keep.append(buf)
            arr[k].name = name.encode()  # ctypes keeps the bytes alive with the array
            arr[k].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[k].size = buf.size
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(ll.llama_model_imatrix_data))

    def write(tmp: str) -> None:
        from lcc_harness.engines.llamacpp._log import last_log_error

        rc = ll.llama_model_quantize(str(reference).encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            raise EngineError(
                f"llama.cpp could not quantize '{reference.name}' to {type_name} (code {rc}"
                f"{': ' + last_log_error() if last_log_error() else ''}); "
                + (
                    "this type needs an importance matrix: pass --imatrix FILE"
                    if imatrix is None
                    else "check --imatrix"
                )
            )

    out.parent.mkdir(parents=True, exist_ok=True)
    with entry_lock(out):
        if not out.is_file():
            atomic_write(out, write)
    del keep
    return out


def cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    from lcc_harness.files import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir()


# ---- a transformers folder written as a GGUF (the llama.cpp engine's reference of an HF model) --------------
# HF Llama parameter (under model.layers.N.) → llama.cpp tensor name (under blk.N.), and the q/k heads permuted to
# llama.cpp's rotary layout (convert_hf_to_gguf's LlamaModel.permute)
_LLAMA_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _rotary_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's q/k rows (rotate-half pairs) in llama.cpp's order (interleaved pairs): (out, in) → (out, in)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _bpe_vocab(folder: Path) -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """(tokens by id, token types, merges, special ids) of a byte-level BPE tokenizer.json; EngineError otherwise."""
    import json

    path = folder / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise EngineError(
            f"'{folder}' has no readable tokenizer.json; the llama.cpp engine converts byte-level BPE tokenizers "
            "only — convert the model with llama.cpp's convert_hf_to_gguf.py and pass the .gguf"
        ) from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise EngineError(
            f"'{folder}': its tokenizer is {model.get('type')!r}, not byte-level BPE; convert the model with llama.cpp's "
            "convert_hf_to_gguf.py and pass the .gguf"
        )
    vocab = dict(model["vocab"])
    added = {a["content"]: a["id"] for a in tj.get("added_tokens") or []}
    vocab.update(added)
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for t, i in vocab.items():
        tokens[i] = t
    types = [1] * n  # normal
    for i in added.values():
        types[i] = 3  # control
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges, added


def hf_reference_gguf(folder: Path, dtype: str, cache_dir: Path) -> Path:
    """A transformers Llama-family folder (LlamaForCausalLM, byte-level BPE tokenizer) written as a GGUF of the
    run's dtype with llama.cpp's tensor names, its q/k heads permuted to llama.cpp's rotary layout; cached by the
    folder's config, tokenizer and weight files. Other architectures and tokenizers: EngineError naming
    convert_hf_to_gguf.py."""
    import json

    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise EngineError(
            f"'{folder}' has no readable config.json; pass a transformers model folder or a .gguf"
        ) from None
    archs = cfg.get("architectures") or []
    if archs != ["LlamaForCausalLM"]:
        raise EngineError(
            f"'{folder}' is {archs or 'of an unknown architecture'}; the llama.cpp engine writes Llama folders only — "
            "convert other architectures with llama.cpp's convert_hf_to_gguf.py and pass the .gguf"
        )
    if cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise EngineError(
            f"'{folder}' uses rope scaling; convert it with convert_hf_to_gguf.py and pass the .gguf"
        )
    weights = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")])
    if not weights:
        raise EngineError(f"'{folder}' holds no weights (*.safetensors); save the model with save_pretrained")
    h = hashlib.sha256()
    for p in [folder / "config.json", folder / "tokenizer.json", *weights]:
        if p.is_file():
            h.update(p.name.encode())
            h.update(file_sha256(p).encode())
    type_name = REFERENCE_TYPES.get(dtype, (None,))[0]
    if type_name is None:
        raise EngineError(
            f"dtype '{dtype}' has no GGUF reference type; use one of {', '.join(REFERENCE_TYPES)}"
        )
    out = Path(cache_dir) / "llama.cpp" / f"{folder.name}-{h.hexdigest()[:16]}.{type_name}.gguf"
    if out.is_file():
        return out
    tokens, types, merges, added = _bpe_vocab(folder)
    with entry_lock(out):
        if not out.is_file():
            atomic_write(out, lambda tmp: _write_hf_llama(folder, cfg, tokens, types, merges, tmp, type_name))
    return out


def _write_hf_llama(
    folder: Path, cfg: dict, tokens: list[str], types: list[int], merges: list[str], tmp: str, type_name: str
) -> None:
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    c = model.config
    n_head, n_kv = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
    rope = getattr(c, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    if len(tokens) < c.vocab_size:
        tokens = tokens + [f"[PAD{i}]" for i in range(len(tokens), c.vocab_size)]
        types = types + [5] * (c.vocab_size - len(types))  # unused
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(folder.name)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(c.vocab_size)
    w.add_file_type({"F32": 0, "F16": 1, "BF16": 32}[type_name])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens[: c.vocab_size])
    w.add_token_types(types[: c.vocab_size])
    w.add_token_merges(merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        v = getattr(c, key, None)
        if isinstance(v, int) and 0 <= v < c.vocab_size:
            add(v)
    w.add_add_bos_token(False)

    def put(name: str, t: torch.Tensor) -> None:
        arr = t.detach().to(torch.float32).cpu().numpy()
        if type_name == "F16" and arr.ndim >= 2:
            w.add_tensor(name, arr.astype(np.float16))
        elif type_name == "BF16" and arr.ndim >= 2:
            from gguf import GGMLQuantizationType as Q
            from gguf import quants

            raw = quants.quantize(arr, Q.BF16)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=Q.BF16)
        else:
            w.add_tensor(name, arr)

    sd = model.state_dict()
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        for hf, ll in _LLAMA_BLOCK.items():
            t = sd[f"model.layers.{i}.{hf}"]
            if hf == "self_attn.q_proj.weight":
                t = torch.from_numpy(_rotary_permute(t.float().numpy(), n_head))
            elif hf == "self_attn.k_proj.weight":
                t = torch.from_numpy(_rotary_permute(t.float().numpy(), n_kv))
            put(f"blk.{i}.{ll}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
