"""A compressed checkpoint measured as the method: `lcc measure --model REF --compressed PATH`.

The checkpoint (a .gguf file or a Hugging Face directory, anything `models.load_model` reads) is loaded on the
reference's device and dtype and must be the same model as the reference up to its weights: the same tokenizer
(vocabulary and special tokens, hashed) and the same architecture (class, the config fields that fix the shapes
and the positional scheme, every parameter's name and shape). Anything else is a CheckpointError naming the first
mismatch, before any measurement.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from lcc_harness.errors import CheckpointError, HarnessError
from lcc_harness.files import file_sha256
from lcc_harness.methods._targets import linearize_conv1d
from lcc_harness.models.load import LoadedModel, load_model

if TYPE_CHECKING:
    from lcc_harness.engines.results import MethodResult
    from lcc_harness.engines.torch.harness import Harness

# Config fields that must agree: together with the parameter shapes they fix what a position's output depends on.
ARCH_FIELDS: tuple[str, ...] = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "hidden_act",
    "rms_norm_eps",
    "layer_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "tie_word_embeddings",
    "sliding_window",
)
SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _vocab(tok: Any) -> dict[str, int]:
    get = getattr(tok, "get_vocab", None)
    if callable(get):
        return dict(get())
    return {f"<byte {i}>": i for i in range(int(getattr(tok, "vocab_size", 0)))}  # models.ByteTokenizer


def _specials(tok: Any) -> dict[str, Any]:
    """Special tokens by role (bos, eos, …) with their ids, and the list of all special tokens with ids."""
    out: dict[str, Any] = {}
    for attr in SPECIAL_ATTRS:
        t = getattr(tok, attr, None)
        if t is not None:
            out[attr] = [str(t), getattr(tok, f"{attr}_id", None)]
    every = getattr(tok, "all_special_tokens", None) or []
    ids = getattr(tok, "all_special_ids", None) or [None] * len(every)
    out["all"] = sorted([str(t), i] for t, i in zip(every, ids, strict=False))
    return out


def tokenizer_identity(tok: Any) -> dict[str, str]:
    """{'vocab': sha256 of the token → id map, 'special': sha256 of the special tokens and their ids}."""
    return {"vocab": _sha(sorted(_vocab(tok).items())), "special": _sha(_specials(tok))}


def tokenizer_mismatch(ref: Any, cmp: Any) -> str | None:
    """What differs between two tokenizers (vocabulary first, then special tokens), or None."""
    a, b = tokenizer_identity(ref), tokenizer_identity(cmp)
    if a["vocab"] != b["vocab"]:
        va, vb = _vocab(ref), _vocab(cmp)
        if len(va) != len(vb):
            return f"vocabulary of {len(vb)} tokens, the reference's has {len(va)}"
        diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: (kv[1], kv[0]))
        ta = next((t for t, i in va.items() if i == diff[0][1]), None)
        tb = next((t for t, i in vb.items() if i == diff[0][1]), None)
        return f"vocabulary differs: token id {diff[0][1]} is {tb!r}, in the reference {ta!r}"
    if a["special"] != b["special"]:
        sa, sb = _specials(ref), _specials(cmp)
        key = next((k for k in (*SPECIAL_ATTRS, "all") if sa.get(k) != sb.get(k)), "all")  # roles first
        return f"special tokens differ: {key} is {sb.get(key)}, in the reference {sa.get(key)}"
    return None


def architecture_mismatch(ref: nn.Module, cmp: nn.Module) -> str | None:
    """What differs between two models' architectures (class, ARCH_FIELDS, parameter names and shapes), or None."""
    if type(ref).__name__ != type(cmp).__name__:
        return f"class {type(cmp).__name__}, the reference is {type(ref).__name__}"
    ca, cb = ref.config.to_dict(), cmp.config.to_dict()
    for k in ARCH_FIELDS:
        if ca.get(k) != cb.get(k):
            return f"config {k} = {cb.get(k)!r}, in the reference {ca.get(k)!r}"
    pa = {n: tuple(t.shape) for n, t in ref.state_dict().items()}
    pb = {n: tuple(t.shape) for n, t in cmp.state_dict().items()}
    missing, extra = sorted(set(pa) - set(pb)), sorted(set(pb) - set(pa))
    if missing:
        return f"parameter {missing[0]} is missing ({len(missing)} missing in all)"
    if extra:
        return f"parameter {extra[0]} is not in the reference ({len(extra)} extra in all)"
    for n, shape in pa.items():
        if pb[n] != shape:
            return f"parameter {n} has shape {pb[n]}, in the reference {shape}"
    return None


def load_compressed(path: str, ref: LoadedModel) -> LoadedModel:
    """Load the checkpoint at `path` on the reference's device and dtype; CheckpointError unless it has the
    reference's tokenizer and architecture. GPT-2 `Conv1D`s become Linears, as they do for the reference."""
    lm = load_model(path, ref.device, ref.dtype)
    linearize_conv1d(lm.model)
    problem = tokenizer_mismatch(ref.tokenizer, lm.tokenizer)
    what = "tokenizer"
    if problem is None:
        problem, what = architecture_mismatch(ref.model, lm.model), "architecture"
    if problem is not None:
        raise CheckpointError(
            f"compressed model '{path}' does not match the reference '{ref.name}' ({what}: {problem}); "
            "measure a checkpoint compressed from this reference model"
        )
    return lm


def check_name(name: str, what: str) -> str:
    """A checkpoint's name in results and baselines: one word that is not a method id."""
    from lcc_harness.methods.registry import parse_method

    if not name.strip() or any(c.isspace() for c in name) or "=" in name:
        raise HarnessError(f"{what} {name!r} must be one word (it is the method's name in the results)")
    try:
        parse_method(name)
    except HarnessError:
        return name
    raise HarnessError(f"{what} {name!r} is a method id; give the checkpoint another name")


def measure_checkpoint(harness: Harness, path: str, name: str) -> MethodResult:
    """The checkpoint at `path` measured as method `name`: loaded like the reference, checked against it
    (tokenizer and architecture), its file hash and weight fingerprint in method_info, then freed."""
    t0 = time.perf_counter()
    if not Path(path).exists():
        raise HarnessError(f"compressed checkpoint '{path}' does not exist; check the path")
    if getattr(harness, "engine", "torch") == "llama.cpp":  # a GGUF run by llama.cpp itself
        if Path(path).is_dir():
            raise HarnessError(
                f"compressed checkpoint '{path}' is a folder; the llama.cpp engine measures GGUF files — pass a .gguf"
            )
        res = harness.run_checkpoint_file(path, name)
        res.info["method_info"]["compressed_sha256"] = file_sha256(path)
        return res
    lm = load_compressed(path, harness.lm)
    info = {
        "compressed": lm.source,
        "compressed_sha256": file_sha256(path),
        "compressed_fingerprint": lm.fingerprint(),
    }
    try:
        return harness.run_checkpoint(lm.model, name, time.perf_counter() - t0, info)
    finally:
        del lm
