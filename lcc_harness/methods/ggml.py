"""llama.cpp's legacy block quantizers (GGUF types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) as weight methods.

Each target weight (O, I) is quantized and dequantized by gguf-py (`gguf.quants.quantize` / `dequantize`, the
reference Python port of ggml-quants.c) in blocks of 32 consecutive input weights of one output row: what a
llama.cpp user gets from `llama-quantize` with that type for these tensors, simulated in float. The conversion
to numpy is float32 whatever the model's dtype; the result is cast back to the weight's dtype and device.

Bits per weight are the type's storage cost, fp16 block scale (and minimum) included: 8 · type_size / 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lcc_harness.errors import MethodError
from lcc_harness.methods.registry import CompressContext, EngineSpec, WeightMethod, param, register

# (bits, variant) → GGML type name; variant 0 = symmetric (scale only), 1 = scale and minimum.
GGML_TYPES: dict[tuple[int, int], str] = {
    (4, 0): "Q4_0",
    (4, 1): "Q4_1",
    (5, 0): "Q5_0",
    (5, 1): "Q5_1",
    (8, 0): "Q8_0",
}


def ggml_type(name: str):  # -> gguf.GGMLQuantizationType (gguf is imported lazily)
    """The gguf-py quantization type named `name` ('Q4_0', …)."""
    import gguf

    return gguf.GGMLQuantizationType[name]


def ggml_block(name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of GGML type `name`, from gguf-py's table."""
    import gguf

    return gguf.GGML_QUANT_SIZES[ggml_type(name)]


def ggml_bits(name: str) -> float:
    """Storage bits per weight of GGML type `name` (Q4_0: 18 bytes per 32 weights = 4.5)."""
    block, size = ggml_block(name)
    return 8 * size / block


def ggml_fake_quant(w: torch.Tensor, name: str) -> torch.Tensor:
    """gguf-py's dequantize(quantize(w)) of a 2-D weight (O, I) in GGML type `name`, blocks along I; numpy
    work in float32, the result in w's dtype and on w's device. I must be a multiple of the block size."""
    from gguf import quants

    qtype = ggml_type(name)
    x = w.detach().to("cpu", torch.float32).contiguous().numpy()  # (O, I) float32
    deq = quants.dequantize(quants.quantize(x, qtype), qtype)  # (O, I) float32
    return torch.from_numpy(deq.reshape(x.shape)).to(device=w.device, dtype=w.dtype)


@register
@dataclass(frozen=True)
class GGUFQuant(WeightMethod):
    """A GGUF legacy quant type, written gguf-q{bits}_{variant} like llama.cpp's names (gguf-q4_0 = Q4_0)."""

    bits: int = param(4, 4, 8)
    variant: int = param(0, 0, 1, hint="0 or 1")

    family = "gguf"
    engines = ("torch", "llama.cpp")  # simulated by gguf-py in torch; llama.cpp's quantizer and kernels there
    forms = ("gguf-q{bits}_{variant}",)
    examples = ("gguf-q4_0", "gguf-q4_1", "gguf-q5_0", "gguf-q5_1", "gguf-q8_0")
    description = (
        "llama.cpp's GGUF block quantizers via gguf-py (quantize → dequantize, blocks of 32 input weights): "
        "q4_0 4.5, q4_1 5.0, q5_0 5.5, q5_1 6.0, q8_0 8.5 bits/weight"
    )

    def validate(self) -> None:
        if (self.bits, self.variant) not in GGML_TYPES:
            valid = ", ".join(f"gguf-q{b}_{v}" for b, v in GGML_TYPES)
            raise MethodError(
                f"method '{self._draft_id()}': GGUF has no legacy type Q{self.bits}_{self.variant}; "
                f"use one of {valid}"
            )

    @property
    def type_name(self) -> str:
        """The GGML type name, e.g. 'Q4_0'."""
        return GGML_TYPES[(self.bits, self.variant)]

    def engine_spec(self) -> EngineSpec:
        """Under llama.cpp: the reference GGUF quantized to this type by llama.cpp itself."""
        return EngineSpec(weight_type=self.type_name.lower())

    def transform(self, name: str, lin: nn.Linear, ctx: CompressContext, state: None) -> float:
        block, _ = ggml_block(self.type_name)
        if lin.in_features % block:
            raise MethodError(
                f"method '{self.id}': the input width {lin.in_features} of {name} is not a multiple of the "
                f"{self.type_name} block size {block}; GGUF cannot store this layer in {self.type_name} — "
                "exclude it (RunConfig.exclude) or use an rtn-w{b}-g{G} method with a G that divides it"
            )
        lin.weight.copy_(ggml_fake_quant(lin.weight, self.type_name))
        return ggml_bits(self.type_name)
