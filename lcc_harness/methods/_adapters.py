"""Adapters to quantization libraries (torchao, HQQ, bitsandbytes, optimum-quanto): the shared traversal.

A family sets `library` (registry.Library: import name, pip distribution, pinned version) and `allowed` (the
values its library supports), and writes one of two shapes: PerLayer.quantize_layer (one Linear → its dequantized
weight, bits per weight, and the library's module for `-kernel`: HQQ, bitsandbytes) or WholeModel.quantize_model
(the library walks the model given the targets' names; each target's weight dequantizes: torchao, quanto). Two
modes:

- default (dequantized): the library's dequantized weights are copied back into the original nn.Linear
  parameters, and any module or parameter the library swapped in is put back, so the model keeps its module
  tree and plain nn.Linear layers (the reference-summary path, snapshots and outlier records apply as for rtn);
- `-kernel`: the library's own modules or tensor subclasses stay in the forward (its CPU kernels run, with
  whatever it does besides the weight rounding, e.g. activation quantization).

The library is imported on first use (`Library.load`), never when the harness is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

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
    and method_info["library"] = "dist==version", ["mode"] = "dequantized" or "kernel"). A family declares the
    values its library supports (`allowed`: field → values) and derives from PerLayer or WholeModel."""

    allowed: ClassVar[dict[str, tuple[Any, ...]]] = {}  # field → the values the library supports

    @property
    def keeps_library_modules(self) -> bool:
        """Whether the library's modules stay in the forward (the `-kernel` mode)."""
        return bool(getattr(self, "kernel", False))

    def validate(self) -> None:
        for name, values in self.allowed.items():
            if getattr(self, name) not in values:
                raise MethodError(
                    f"method '{self._draft_id()}': {self.library.dist} has no {name} {getattr(self, name)}; "
                    f"use {name} in {values}"
                )

    def check(self, name: str, lin: nn.Linear) -> None:
        """MethodError when the library cannot quantize layer `name` with this method (checked before any is)."""

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
        for name, lin in linears:  # every layer checked before any is quantized
            self.check(name, lin)
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


class PerLayer(LibraryMethod):
    """A library that quantizes one Linear at a time: `quantize_layer` returns its dequantized weight and bits,
    and the library's module for the `-kernel` mode (None in the default mode)."""

    def quantize_layer(self, lib: Any, name: str, lin: nn.Linear) -> tuple[Quantized, nn.Module | None]:
        raise NotImplementedError

    def quantize(
        self, lib: Any, model: nn.Module, linears: list[tuple[str, nn.Linear]], ctx: CompressContext
    ) -> dict[str, Quantized]:
        out = {}
        for name, lin in linears:
            out[name], module = self.quantize_layer(lib, name, lin)
            if module is not None:
                set_submodule(model, name, module)
        return out


class WholeModel(LibraryMethod):
    """A library that quantizes the model given the targets' names (`quantize_model`) and leaves, at each target, a
    module whose weight dequantizes; `bits_per_weight` reads that module."""

    def quantize_model(self, lib: Any, model: nn.Module, names: list[str]) -> None:
        raise NotImplementedError

    def bits_per_weight(self, lin: nn.Linear, module: nn.Module) -> float:
        raise NotImplementedError

    def quantize(
        self, lib: Any, model: nn.Module, linears: list[tuple[str, nn.Linear]], ctx: CompressContext
    ) -> dict[str, Quantized]:
        shapes = {name: (lin.weight.shape, lin.weight.dtype) for name, lin in linears}  # before the library
        self.quantize_model(lib, model, [name for name, _ in linears])
        out = {}
        for name, lin in linears:
            q = model.get_submodule(name)  # the library's weight, (O, I) once dequantized
            shape, dtype = shapes[name]
            out[name] = Quantized(
                q.weight.dequantize().reshape(shape).to(dtype), self.bits_per_weight(lin, q)
            )
        return out
