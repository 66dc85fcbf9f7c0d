"""Model loading: the embedded default, a tiny random model, local HF dirs, cached hub ids, GGUF files.

Nothing here downloads: hub ids resolve only from the local cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lcc_harness.errors import ModelLoadError, ModelNotFoundError, first_line
from lcc_harness.files import file_sha256
from lcc_harness.models.embedded import EMBEDDED, Embedded, converted_dir, ensure_converted

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-llama"
GEMMA3_MODEL = "gemma3-270m"

# Small enough for unit tests in seconds; initializer_range is raised so that the random model's
# next-token distributions are far from uniform and compression error is measurable.
TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    initializer_range=0.15,
    tie_word_embeddings=False,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=257,
)
TINY_SEED = 1234


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: the tokenizer of the tiny test model."""

    vocab_size = 256
    name_or_path = "bytes"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


@dataclass
class LoadedModel:
    """A causal LM ready for measurement, with what identifies it for caches and baselines."""

    name: str
    model: nn.Module
    tokenizer: Any
    source: str
    device: torch.device
    dtype: torch.dtype
    max_positions: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device_type(self) -> str:
        return self.device.type

    def fingerprint(self) -> str:
        """sha256 over config, parameter names/shapes and per-tensor sums: changes when the weights do."""
        return model_fingerprint(self.model)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' picks cuda when present; 'cuda' without CUDA is a clear error."""
    name = str(device or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"device '{name}' is not a device name; use cpu, cuda or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device '{name}' was asked for but CUDA is not available here; use --device cpu (or auto)"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device '{name}' is not supported; use cpu, cuda or auto")
    return dev


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None → float32 on CPU, bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        if dtype not in set(_DTYPES.values()):
            raise ModelLoadError(
                f"dtype '{dtype_name(dtype)}' is not supported; use one of float32, bfloat16, float16"
            )
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(
            f"dtype '{dtype}' is not supported; use one of float32, bfloat16, float16"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_tiny_llama(seed: int = TINY_SEED, **overrides: Any) -> nn.Module:
    """A random-init LlamaForCausalLM from TINY_CONFIG and a fixed seed (float32, CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY_CONFIG, **overrides})
    config._attn_implementation = "sdpa"
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model


# Tiny random models of the architectures users run, built in code (no download): each exercises what its family
# does differently from Llama — qkv biases (Qwen2), q/k norms (Qwen3), sliding + global layers, GeGLU, tied
# embeddings and soft caps (Gemma 3), a sliding window (Mistral), fused qkv_proj / gate_up_proj (Phi-3), Conv1D
# (GPT-2). Widths are multiples of 128 so that every method's default group size divides them.
TINY_ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 32,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"],
            "tie_word_embeddings": True,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 32,
        },
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 257}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
}
TINY_ARCH_CONFIG: dict[str, Any] = {**TINY_CONFIG, "hidden_size": 128, "intermediate_size": 256}


def build_tiny_arch(arch: str, seed: int = TINY_SEED) -> nn.Module:
    """A random-init model of one of TINY_ARCHS (float32, CPU, seeded); the sliding windows are shorter than the
    tests' lengths, so that they matter."""
    import transformers

    cfg_name, cls_name, extra = TINY_ARCHS[arch]
    kw = {**TINY_ARCH_CONFIG, **extra}
    if arch == "gpt2":
        kw = dict(
            vocab_size=320, n_positions=4096, n_embd=128, n_layer=2, n_head=4, initializer_range=0.15,
            bos_token_id=256, eos_token_id=257,
        )  # fmt: skip
    config = getattr(transformers, cfg_name)(**kw)
    config._attn_implementation = "sdpa" if arch not in ("gemma3",) else "eager"
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = getattr(transformers, cls_name)(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Resolve a model spec to a LoadedModel in eval mode with gradients off.

    spec: an embedded model ('smollm2-135m', 'gemma3-270m'), 'tiny-llama' or 'tiny-<arch>', a local HF
    directory, a '.gguf' file, or a hub id already cached. `cache_dir`: where an embedded model's assembled GGUF
    and converted copy live (default $LCC_CACHE_DIR or ~/.cache/lcc-harness).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if spec == TINY_MODEL:
        model = build_tiny_llama().to(device=dev, dtype=dt)
        return _finish(spec, model, ByteTokenizer(), f"random init, seed {TINY_SEED}", dev, dt)
    if spec.startswith("tiny-") and spec[5:] in TINY_ARCHS:
        model = build_tiny_arch(spec[5:]).to(device=dev, dtype=dt)
        return _finish(spec, model, ByteTokenizer(), f"random init, seed {TINY_SEED}", dev, dt)
    if spec in EMBEDDED:
        emb = EMBEDDED[spec]
        path = emb.gguf_path(cache_dir)
        if emb.convert:
            model, tok = _load_converted(emb, path, dev, dt, cache_dir)
        else:
            model, tok = _load_gguf(path, dev, dt)
        return _finish(spec, model, tok, str(path), dev, dt, {"gguf_source_quant": emb.source_quant})
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file '{spec}' does not exist; check the path")
        model, tok = _load_gguf(path, dev, dt)
        return _finish(spec, model, tok, str(path.resolve()), dev, dt)
    if path.is_dir():
        model, tok = _load_hf(str(path), dev, dt, what=f"local model directory '{spec}'")
        return _finish(spec, model, tok, str(path.resolve()), dev, dt)
    if path.exists():
        raise ModelNotFoundError(
            f"model '{spec}' is a file but not a .gguf; pass a .gguf file, a model directory, "
            f"'{DEFAULT_MODEL}' or '{TINY_MODEL}'"
        )
    if spec.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"model path '{spec}' does not exist; check the path, or pass '{DEFAULT_MODEL}', '{TINY_MODEL}' "
            "or a cached hub id (org/name)"
        )
    if "/" in spec:
        model, tok = _load_hf(spec, dev, dt, what=f"hub id '{spec}'")
        return _finish(spec, model, tok, f"hf-cache:{spec}", dev, dt)
    raise ModelNotFoundError(
        f"unknown model '{spec}': not an embedded model ({', '.join(EMBEDDED)}), '{TINY_MODEL}', an existing "
        "path, or a hub id (org/name); pass one of those"
    )


def _hf_kwargs(dev: torch.device, dt: torch.dtype) -> dict[str, Any]:
    kw: dict[str, Any] = {"dtype": dt, "attn_implementation": "sdpa"}
    if dev.type == "cuda":
        kw["device_map"] = "auto"  # accelerate spreads a model larger than one GPU
    return kw


def _load_gguf(path: Path, dev: torch.device, dt: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        _check_gguf_header(path)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, **_hf_kwargs(dev, dt)
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # the GGUF reader raises many kinds; all mean the same thing here
        raise ModelLoadError(
            f"GGUF file '{path}' could not be loaded ({type(exc).__name__}: {first_line(exc, with_type=False)}); "
            "the file is corrupt, truncated or of an unsupported architecture — re-download or re-export it"
        ) from exc
    return model, tok


def _load_converted(
    emb: Embedded, path: Path, dev: torch.device, dt: torch.dtype, cache_dir: str | Path | None
) -> tuple[nn.Module, Any]:
    """An embedded GGUF through its converted copy in the cache: written once (float32 safetensors and the
    tokenizer, from transformers' own GGUF loading), keyed by the GGUF's sha256 and the transformers version."""
    import transformers

    key = f"{file_sha256(path)[:16]}-tf{transformers.__version__}"

    def convert(tmp: Path) -> None:
        log.warning(
            "model %s: converting its GGUF once (about a minute); later runs read %s", emb.name, tmp.parent
        )
        model, tok = _load_gguf(path, torch.device("cpu"), torch.float32)
        # transformers marks a GGUF-loaded model as quantized (its GGUF "quantizer" only dequantized it on load)
        # and refuses to save it; its weights are plain float32 tensors, saved as such
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))

    folder = ensure_converted(converted_dir(emb, cache_dir, key), convert)
    return _load_hf(str(folder), dev, dt, what=f"converted copy of '{emb.name}' ({folder})")


def _check_gguf_header(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"'{path}' is not a GGUF file (bad magic {magic!r}); pass a valid .gguf file")


def _load_hf(name: str, dev: torch.device, dt: torch.dtype, what: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, **_hf_kwargs(dev, dt))
    except OSError as exc:
        if what.startswith("hub id"):
            raise ModelNotFoundError(
                f"{what} is not in the local Hugging Face cache and lcc-harness never downloads; "
                f"fetch it beforehand (e.g. `huggingface-cli download {name}`) or pass a local directory"
            ) from exc
        raise ModelLoadError(
            f"{what} could not be loaded: {first_line(exc, with_type=False)}; check that it holds config.json and the weights"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(
            f"{what} could not be loaded ({type(exc).__name__}: {first_line(exc, with_type=False)}); "
            "the weights are corrupt or truncated — re-save the model"
        ) from exc
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{what} has no usable tokenizer ({first_line(exc, with_type=False)}); save the tokenizer "
            "next to the model (tokenizer.save_pretrained)"
        ) from exc
    return model, tok


def _finish(
    name: str,
    model: nn.Module,
    tok: Any,
    source: str,
    dev: torch.device,
    dt: torch.dtype,
    extra: dict[str, Any] | None = None,
) -> LoadedModel:
    model.eval()
    model.requires_grad_(False)
    if not hasattr(model, "hf_device_map"):
        model.to(dev)
    cfg = model.config
    max_pos = int(getattr(cfg, "max_position_embeddings", 0) or 0) or 2048
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tok,
        source=source,
        device=dev,
        dtype=dt,
        max_positions=max_pos,
        extra=dict(extra or {}),
    )


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the config and, per parameter, its name, shape and float64 sums of values and |values|."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = cfg.to_dict()
        for k in ("_name_or_path", "transformers_version", "quantization_config", "dtype", "torch_dtype"):
            d.pop(k, None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            total, absolute = _sums(p.detach())
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{total:.12e}:{absolute:.12e}".encode())
    return h.hexdigest()


def plain_values(t: torch.Tensor) -> torch.Tensor:
    """A parameter as plain values: a quantization library's tensor subclass (torchao's in a checkpoint or an
    adapter's -kernel mode) dequantized; a plain tensor as it is."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "dequantize"):
        return t.dequantize()
    return t


FINGERPRINT_BLOCK = 1 << 22  # elements per float64 block: 32 MiB, whatever the tensor's size


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of a floating-point tensor is finite, checked over blocks of FINGERPRINT_BLOCK elements:
    `torch.isfinite` of a whole 262k-vocabulary embedding would allocate over 1 GB of temporaries."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(block).all()) for block in flat.split(FINGERPRINT_BLOCK))


def _sums(t: torch.Tensor) -> tuple[float, float]:
    """Σ t and Σ |t| accumulated in float64 over blocks of FINGERPRINT_BLOCK elements, on the tensor's device:
    never a float64 copy of the whole tensor (a 7B model's embedding would need 1 GB more)."""
    flat = plain_values(t).reshape(-1)
    total = absolute = 0.0
    for block in flat.split(FINGERPRINT_BLOCK):
        b = block.double()
        total += b.sum().item()
        absolute += b.abs().sum().item()
    return total, absolute
