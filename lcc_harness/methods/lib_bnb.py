"""bitsandbytes adapters on its CPU backend: bnb-nf4, bnb-fp4 (blocks of B weights, `-b{B}`), bnb-int8.

- bnb-nf4 / bnb-fp4: `bitsandbytes.functional.quantize_4bit(w, blocksize=B, quant_type, compress_statistics=False)`
  then `dequantize_4bit`: the weight is cut into blocks of B consecutive values of the row-major (O, I) matrix
  (within one row when B divides I), each scaled by its absmax (float32) onto the 16 NF4 levels (normal
  quantiles) or FP4 (e2m1) values: 4 + 32/B bits per weight. No double quantization of the absmax (transformers'
  default `bnb_4bit_use_double_quant=False`). `-kernel`: a `bnb.nn.Linear4bit` replaces the Linear.
- bnb-int8: `int8_vectorwise_quant` of the weight in float16 (as bnb's Int8Params does), per output row absmax
  to ±127 (float32 row scale: 8 + 32/I bits) — the weight half of LLM.int8(). `-kernel`: `bnb.nn.Linear8bitLt(threshold=6.0, has_fp16_weights=False)`, i.e.
  LLM.int8() as transformers' `load_in_8bit` runs it: per-token int8 activations, except input columns with an
  outlier above 6.0, which go through a float matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lcc_harness.methods._adapters import PerLayer, Quantized
from lcc_harness.methods.registry import Library, param, register

BNB = Library("bitsandbytes", "bitsandbytes", "0.50.2")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, transformers' default


def bnb_fake_quant_4bit(w: torch.Tensor, quant_type: str, blocksize: int) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit(quantize_4bit(w)) of a 2-D weight (O, I); same shape, dtype and device."""
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    return F.dequantize_4bit(q, state).reshape(w.shape).to(w.dtype)


def bnb_fake_quant_int8(w: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' per-row absmax int8 (int8_vectorwise_quant) of a 2-D weight (O, I), dequantized. Of the
    weight in float16, as `Int8Params` quantizes it (so both modes hold the same codes and scales)."""
    import bitsandbytes.functional as F

    codes, row_absmax, _ = F.int8_vectorwise_quant(w.half())  # (O, I) int8, (O,) float32
    return (codes.float() * (row_absmax.float()[:, None] / 127)).to(w.dtype)


def _shape(lin: nn.Linear) -> tuple[int, int, bool]:
    """(in_features, out_features, has a bias): how a library's Linear is built in the shape of `lin`."""
    return lin.in_features, lin.out_features, lin.bias is not None


@dataclass(frozen=True)
class _BNB4(PerLayer):
    """NF4 and FP4: the same fields, forms and Linear4bit path; the subclasses name the 4-bit type."""

    blocksize: int = param(64, 64, 4096, hint="64, 128, …, 4096")
    kernel: bool = False

    library = BNB
    quant_type = ""

    allowed = {"blocksize": BLOCKSIZES}

    def quantize_layer(self, lib: Any, name: str, lin: nn.Linear) -> tuple[Quantized, nn.Module | None]:
        w = lin.weight  # (O, I)
        deq = Quantized(bnb_fake_quant_4bit(w, self.quant_type, self.blocksize), 4 + 32 / self.blocksize)
        if not self.kernel:
            return deq, None
        q = lib.nn.Linear4bit(
            *_shape(lin), compute_dtype=w.dtype, compress_statistics=False, quant_type=self.quant_type
        )
        q.weight = lib.nn.Params4bit(
            w.detach().clone(), requires_grad=False, blocksize=self.blocksize,
            compress_statistics=False, quant_type=self.quant_type,
        )  # fmt: skip
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return deq, q.to(w.device)  # .to quantizes the Params4bit


@register
@dataclass(frozen=True)
class BnbNF4(_BNB4):
    family, quant_type = "bnb-nf4", "nf4"
    forms = ("bnb-nf4[-b{blocksize}][-kernel]",)
    examples = ("bnb-nf4", "bnb-nf4-b128")
    description = (
        "bitsandbytes NF4 (16 normal-quantile levels, absmax per block of B weights, default 64; 4 + 32/B "
        "bits); -kernel keeps bnb.nn.Linear4bit in the forward"
    )


@register
@dataclass(frozen=True)
class BnbFP4(_BNB4):
    family, quant_type = "bnb-fp4", "fp4"
    forms = ("bnb-fp4[-b{blocksize}][-kernel]",)
    examples = ("bnb-fp4",)
    description = (
        "bitsandbytes FP4 (e2m1 values, absmax per block of B weights, default 64; 4 + 32/B bits); -kernel "
        "keeps bnb.nn.Linear4bit in the forward"
    )


@register
@dataclass(frozen=True)
class BnbInt8(PerLayer):
    kernel: bool = False

    family = "bnb-int8"
    forms = ("bnb-int8[-kernel]",)
    examples = ("bnb-int8",)
    description = (
        "bitsandbytes int8 per output row (absmax to ±127, 8 + 32/I bits); -kernel runs LLM.int8() "
        "(Linear8bitLt, int8 activations with outlier columns above 6.0 in float)"
    )
    library = BNB

    def quantize_layer(self, lib: Any, name: str, lin: nn.Linear) -> tuple[Quantized, nn.Module | None]:
        w = lin.weight  # (O, I)
        deq = Quantized(bnb_fake_quant_int8(w), 8 + 32 / lin.in_features)
        if not self.kernel:
            return deq, None
        q = lib.nn.Linear8bitLt(*_shape(lin), has_fp16_weights=False, threshold=INT8_THRESHOLD)
        q.load_state_dict(lin.state_dict())
        return deq, q.to(w.device)  # .to quantizes the Int8Params
