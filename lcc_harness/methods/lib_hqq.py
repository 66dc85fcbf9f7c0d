"""HQQ adapter (Half-Quadratic Quantization, calibration-free): hqq-w{b}-g{G}[-kernel].

Each target goes through `HQQLinear(linear, BaseQuantizeConfig(nbits=b, group_size=G, axis=1))`: groups of G
consecutive input weights of one row (axis=1, the groups rtn uses; HQQ's own default axis=0 groups along the
output dimension), a min-max start then HQQ's half-quadratic optimizer of the zero point and scale (an lp-norm,
p < 1, fit of the rounding error); the zero point is rounded to an integer at 4 bits only (HQQ's default). Scale and zero are kept as floats in the weight dtype: b + 2·16/G bits per
weight counted as fp16. Default mode: `HQQLinear.dequantize()` copied into the original nn.Linear; `-kernel`:
the HQQLinear replaces the Linear, with HQQ's PyTorch backend (the one that runs on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lcc_harness.methods._adapters import PerLayer, Quantized, require_divisor
from lcc_harness.methods._quant import SCALE_BITS
from lcc_harness.methods.registry import Library, param, register

HQQ = Library(
    "hqq.core.quantize", "hqq", "0.2.8.post1", pip="DISABLE_CUDA=1 pip install --no-build-isolation"
)
HQQ_BITS = (2, 3, 4, 8)


def hqq_linear(
    lin: nn.Linear, bits: int, group: int, optimize: bool = True, round_zero: bool | None = None
) -> Any:
    """An HQQLinear (PyTorch backend) quantizing `lin`'s weight (O, I) per group of `group` input weights; `lin`
    itself is left as it was. optimize=False skips the half-quadratic fit (min-max only); round_zero=None keeps
    HQQ's default (an integer zero point at 4 bits only, a float one otherwise)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)
    cfg["weight_quant_params"]["optimize"] = optimize
    if round_zero is not None:
        cfg["weight_quant_params"]["round_zero"] = round_zero
    w = lin.weight
    return HQQLinear(lin, quant_config=cfg, compute_dtype=w.dtype, device=str(w.device), del_orig=False)


@register
@dataclass(frozen=True)
class HQQQuant(PerLayer):
    bits: int = param(4, 2, 8, hint="2, 3, 4 or 8")
    group: int = param(64, 8, 1 << 20, hint="divisor of the input width")
    kernel: bool = False

    family = "hqq"
    forms = ("hqq-w{bits}-g{group}[-kernel]",)
    examples = ("hqq-w4-g64", "hqq-w3-g32")
    description = (
        "HQQ (half-quadratic, no calibration): {2,3,4,8} bits per group of G input weights, float scale and "
        "zero fitted by HQQ's optimizer; -kernel keeps HQQLinear (PyTorch backend) in the forward"
    )
    library = HQQ

    allowed = {"bits": HQQ_BITS}

    def check(self, name: str, lin: nn.Linear) -> None:
        require_divisor(self.id, name, lin.in_features, self.group)

    def quantize_layer(self, lib: Any, name: str, lin: nn.Linear) -> tuple[Quantized, nn.Module | None]:
        h = hqq_linear(lin, self.bits, self.group)
        deq = h.dequantize().reshape(lin.weight.shape).to(lin.weight.dtype)  # (O, I)
        return Quantized(deq, self.bits + 2 * SCALE_BITS / self.group), h if self.kernel else None
