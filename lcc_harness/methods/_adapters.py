"""Adapters to quantization libraries (torchao, HQQ, bitsandbytes, optimum-quanto): the shared traversal.

A family sets `library` (registry.Library: import name, pip distribution, pinned version) and writes `quantize`,
which hands the target Linears to the library and returns, per target, the dequantized weight and its bits per
weight. Two modes:

- default (dequantized): the library's dequantized weights are copied back into the original nn.Linear
  parameters, and any module or parameter the library swapped in is put back, so the model keeps its module
  tree and plain nn.Linear layers (the reference-summary path, snapshots and outlier records apply as for rtn);
- `-kernel`: the library's own modules or tensor subclasses stay in the forward (its CPU kernels run, with
  whatever it does besides the weight rounding, e.g. activation quantization).

The library is imported on first use (`Library.load`), never when the harness is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lcc_harness.errors import MethodError
from lcc_harness.methods._outliers import OutlierWatch
from lcc_harness.methods.registry import CompressContext, Method, record_bits


@dataclass(frozen=True)
class Quantized:
    """One target after the library: its dequantized weight (out, in) and its bits per weight."""

    weight: torch.Tensor
    bits: float


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at qualified name `name` of `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def require_divisor(method_id: str, name: str, width: int, group: int, what: str = "group size") -> None:
    """MethodError unless `group` divides the input width `width` of layer `name`."""
    if group > 0 and width % group:
        raise MethodError(
            f"method '{method_id}': {what} {group} does not divide the input width {width} of {name}; use a "
            "divisor of it, or exclude the layer (RunConfig.exclude)"
        )


class LibraryMethod(Method):
    """Base of the adapter families: `quantize` runs the library, `apply` does the rest (modes, bits, outliers,
    and method_info["library"] = "dist==version", ["mode"] = "dequantized" or "kernel")."""

    @property
    def keeps_library_modules(self) -> bool:
        """Whether the library's modules stay in the forward (the `-kernel` mode)."""
        return bool(getattr(self, "kernel", False))

    def quantize(
        self, lib: Any, model: nn.Module, linears: list[tuple[str, nn.Linear]], ctx: CompressContext
    ) -> dict[str, Quantized]:
        """Quantize every target of `linears` with the library `lib` (the imported module), leaving the library's
        modules or tensors in `model`; return per target name its dequantized weight and bits per weight."""
        raise NotImplementedError

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        lib = self.library.load(self.id)
        linears = ctx.linears(model)
        watch = OutlierWatch(linears)
        params = {name: (lin, lin.weight, lin.bias) for name, lin in linears}
        done = self.quantize(lib, model, linears, ctx)
        if not self.keeps_library_modules:
            for name, (lin, weight, bias) in params.items():
                set_submodule(model, name, lin)  # the library may have swapped the module …
                lin.weight, lin.bias = weight, bias  # … or its parameters
                weight.copy_(done[name].weight.reshape(weight.shape))
        record_bits(ctx, [(weight.numel(), done[name].bits) for name, (_, weight, _) in params.items()])
        watch.record_weights({name: q.weight for name, q in done.items()}, ctx.info)
        ctx.info["library"] = f"{self.library.dist}=={self.library.version()}"
        ctx.info["mode"] = "kernel" if self.keeps_library_modules else "dequantized"
        return model
