"""Methods that only the llama.cpp engine runs: GGUF weight types quantized by llama.cpp itself
(`llama_model_quantize`) and KV-cache types (the context's `type_k` / `type_v`), and their composition
`gguf-q4_k_m+kv-q8_0`.

A method here is data, like every other: `engine_spec()` says what the engine must do (which file type to
quantize the reference GGUF to, which cache types to run with); the engine does it (engines/llamacpp.py). The
legacy block types (gguf-q4_0 … gguf-q8_0) belong to the `gguf` family (methods/ggml.py), which both engines run:
simulated in torch by gguf-py, through llama.cpp's own quantizer and kernels under `--engine llama.cpp`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from lcc_harness.errors import MethodError
from lcc_harness.methods.registry import CompressContext, EngineSpec, Method, register

# llama_ftype values (llama.h) of the weight types this family names; the legacy q4_0 … q8_0 are the `gguf`
# family's. IMATRIX_REQUIRED: types llama.cpp refuses to make without an importance matrix.
LLAMA_FTYPES: dict[str, int] = {
    "q2_k": 10,
    "q2_k_s": 21,
    "q3_k_s": 11,
    "q3_k_m": 12,
    "q3_k_l": 13,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
    "iq4_nl": 25,
    "iq4_xs": 30,
    "iq3_xxs": 23,
    "iq3_s": 26,
    "iq3_m": 27,
    "iq2_xxs": 19,
    "iq2_xs": 20,
    "iq2_s": 28,
    "iq2_m": 29,
    "iq1_s": 24,
    "iq1_m": 31,
    "tq1_0": 36,
    "tq2_0": 37,
    "f16": 1,
    "bf16": 32,
}
LEGACY_FTYPES: dict[str, int] = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q8_0": 7}
IMATRIX_REQUIRED = frozenset({"iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m", "q2_k_s"})

# ggml_type values (ggml.h) of the KV-cache types llama.cpp's CPU backend runs; the short spelling in
# kv-k{K}-v{V} drops the q of a q-type (kv-k8_0-v4_0 = K q8_0, V q4_0)
KV_TYPES: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "bf16": 30,
    "q8_0": 8,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "iq4_nl": 20,
}


def _short(kv_type: str) -> str:
    return kv_type[1:] if kv_type.startswith("q") else kv_type


_FROM_SHORT = {_short(t): t for t in KV_TYPES}


@register
@dataclass(frozen=True)
class LlamaWeightType(Method):
    """A GGUF weight type that llama.cpp quantizes the reference to (k-quants, i-quants, f16/bf16)."""

    ftype: str = "q4_k_m"

    family = "gguf-llama"
    engines: ClassVar[tuple[str, ...]] = ("llama.cpp",)
    pattern = re.compile(r"gguf-(?P<ftype>" + "|".join(sorted(LLAMA_FTYPES, key=len, reverse=True)) + ")")
    forms = ("gguf-{type}",)
    examples = ("gguf-q4_k_m", "gguf-q6_k", "gguf-q5_k_m", "gguf-q3_k_m", "gguf-q2_k", "gguf-iq4_nl")
    description = (
        "llama.cpp's own quantizer (llama_model_quantize) from the reference GGUF, its kernels at run time "
        "(8-bit activations on CPU): k-quants q2_k … q6_k (with _s/_m/_l mixes), i-quants (iq2_* and iq1_* need "
        "--imatrix), f16, bf16; the legacy q4_0 … q8_0 are the gguf family"
    )

    @classmethod
    def from_match(cls, m: re.Match[str]) -> Method:
        return cls(m["ftype"])

    @property
    def id(self) -> str:
        return f"gguf-{self.ftype}"

    def validate(self) -> None:
        if self.ftype not in LLAMA_FTYPES:
            raise MethodError(f"unknown GGUF type '{self.ftype}'; use one of {', '.join(LLAMA_FTYPES)}")

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(weight_type=self.ftype)

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        raise MethodError(engine_only(self.id, "llama.cpp"))


@register
@dataclass(frozen=True)
class KVCacheType(Method):
    """llama.cpp's KV cache in a given type, K and V separately: kv-q8_0 (both), kv-k8_0-v4_0 (K q8_0, V q4_0)."""

    key: str = "q8_0"
    value: str = "q8_0"

    family = "kv-llama"
    engines: ClassVar[tuple[str, ...]] = ("llama.cpp",)
    _both = "|".join(sorted(KV_TYPES, key=len, reverse=True))
    _each = "|".join(sorted(_FROM_SHORT, key=len, reverse=True))
    pattern = re.compile(rf"kv-(?:(?P<both>{_both})|k(?P<k>{_each})-v(?P<v>{_each}))")
    forms = ("kv-{type}", "kv-k{K}-v{V}")
    examples = ("kv-q8_0", "kv-q4_0", "kv-q5_1", "kv-iq4_nl", "kv-k8_0-v4_0", "kv-f16")
    description = (
        "llama.cpp's KV cache stored as f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 or iq4_nl (K and V apart: "
        "kv-k8_0-v4_0); measured against a reference with the same attention path (flash attention)"
    )

    @classmethod
    def from_match(cls, m: re.Match[str]) -> Method:
        if m["both"]:
            return cls(m["both"], m["both"])
        return cls(_FROM_SHORT[m["k"]], _FROM_SHORT[m["v"]])

    @property
    def id(self) -> str:
        if self.key == self.value:
            return f"kv-{self.key}"
        return f"kv-k{_short(self.key)}-v{_short(self.value)}"

    def validate(self) -> None:
        for t in (self.key, self.value):
            if t not in KV_TYPES:
                raise MethodError(f"unknown KV-cache type '{t}'; use one of {', '.join(KV_TYPES)}")

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(type_k=self.key, type_v=self.value)

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        raise MethodError(engine_only(self.id, "llama.cpp"))


def engine_only(method_id: str, engine: str) -> str:
    """The one-line refusal of a method on an engine that does not run it."""
    if engine == "llama.cpp":
        return (
            f"method '{method_id}' runs on the llama.cpp engine only (llama.cpp quantizes or caches it); pass "
            "--engine llama.cpp"
        )
    return (
        f"method '{method_id}' runs on the torch engine only (it rewrites torch weights or hooks torch "
        "attention); pass --engine torch, or under llama.cpp use a GGUF type (gguf-q4_0, gguf-q4_k_m, …) or a "
        "KV-cache type (kv-q8_0, …)"
    )
