"""optimum-quanto adapter: quanto-w{2,4,8}[-kernel] = `quantize(model, weights=qint{b}, include=targets)`, `freeze`.

quanto's own choices, kept: qint8 is per output row, symmetric (8 + 16/I bits); qint4 / qint2 are asymmetric per
group along the input with a float scale and a float shift ("zero point" in float, not rounded: b + 2·16/g bits)
whose size g quanto picks per layer: 128, or the largest of 96, 64, 32 that divides the input width (SmolLM2:
576 → 96, 1536 → 128), or the whole row when the width is 128 or less (the tiny model: 64). method_info records
the group sizes used. The first int2/int4 dequantization on a CPU compiles quanto's C++ unpack extension into its
package folder (about a minute on 2 cores, once per torch version; the folder must be writable).
Default mode: `QLinear.weight.dequantize()` copied into the original nn.Linear, which is put back; `-kernel`:
quanto's QLinear stays in the forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lcc_harness.methods._adapters import Quantized, WholeModel
from lcc_harness.methods._quant import SCALE_BITS
from lcc_harness.methods.registry import CompressContext, Library, param, register

QUANTO = Library("optimum.quanto", "optimum-quanto", "0.2.7")
QUANTO_BITS = (2, 4, 8)


@register
@dataclass(frozen=True)
class QuantoQuant(WholeModel):
    bits: int = param(4, 2, 8, hint="2, 4 or 8")
    kernel: bool = False

    family = "quanto"
    forms = ("quanto-w{bits}[-kernel]",)
    examples = ("quanto-w4", "quanto-w8")
    description = (
        "optimum-quanto weights qint{2,4,8}: int8 per row symmetric; int2/int4 asymmetric per group (quanto "
        "picks 128/96/64/32 or the row) with float scale and shift; -kernel keeps quanto's QLinear"
    )
    library = QUANTO

    allowed = {"bits": QUANTO_BITS}

    def quantize_model(self, lib: Any, model: nn.Module, names: list[str]) -> None:
        lib.quantize(model, weights=getattr(lib, f"qint{self.bits}"), include=names)
        lib.freeze(model)  # quanto's QLinear took over the weight (the original Linear's is None now)

    def bits_per_weight(self, lin: nn.Linear, module: nn.Module) -> float:
        if self.bits == 8:
            return 8 + SCALE_BITS / lin.in_features
        return self.bits + 2 * SCALE_BITS / (module.weight_group_size or lin.in_features)

    def quantize(
        self, lib: Any, model: nn.Module, linears: list[tuple[str, nn.Linear]], ctx: CompressContext
    ) -> dict[str, Quantized]:
        out = super().quantize(lib, model, linears, ctx)
        if self.bits != 8:  # the group sizes quanto picked
            groups = {model.get_submodule(name).weight_group_size or lin.in_features for name, lin in linears}
            ctx.info["quanto_group_sizes"] = sorted(groups)
        return out
