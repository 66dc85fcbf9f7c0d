"""torchao adapters: `quantize_(model, config, filter_fn)` on the harness's targets.

- torchao-w{b}-g{G}: IntxWeightOnlyConfig(torch.int{b}, PerGroup(G) (g0: PerAxis(0)), ASYMMETRIC): per group
  of G input weights of one row, min-max scale and integer zero point, b + (16 + b)/G bits per weight as rtn
  counts them (torchao keeps the codes unpacked in int8 on the CPU: that is its storage, not the format's);
- torchao-int8wo: Int8WeightOnlyConfig, per output row symmetric int8 (8 + 16/I bits);
- torchao-w8a8: Int8DynamicActivationInt8WeightConfig, per-row symmetric int8 weights and dynamic per-token
  symmetric int8 activations in the forward: kernel mode only (a dequantized weight would drop the activation
  rounding).

Default mode: the tensor subclass torchao puts in each Linear is dequantized back into the original float
parameter; `-kernel` keeps the subclass (the module tree is the same either way: torchao keeps nn.Linear).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lcc_harness.methods._adapters import WholeModel, require_divisor
from lcc_harness.methods._quant import effective_bits
from lcc_harness.methods.registry import Library, param, register

TORCHAO = Library("torchao", "torchao", "0.18.0")


class _TorchAO(WholeModel):
    library = TORCHAO

    def config(self, lib: Any) -> Any:
        """The torchao config this method applies."""
        raise NotImplementedError

    def quantize_model(self, lib: Any, model: nn.Module, names: list[str]) -> None:
        from torchao.quantization import quantize_

        targets = set(names)
        quantize_(model, self.config(lib), filter_fn=lambda module, fqn: fqn in targets)


@register
@dataclass(frozen=True)
class TorchAOIntx(_TorchAO):
    bits: int = param(4, 2, 8)
    group: int = param(64, 0, 1 << 20, hint="divisor of the input width, 0 = per channel")
    kernel: bool = False

    family = "torchao"
    forms = ("torchao-w{bits}-g{group}[-kernel]",)
    examples = ("torchao-w4-g64", "torchao-w2-g32")
    description = (
        "torchao IntxWeightOnlyConfig: int{2..8} per group of G input weights (g0 per channel), asymmetric "
        "min-max with integer zero point (as rtn); -kernel keeps torchao's tensor subclass in the forward"
    )

    def config(self, lib: Any) -> Any:
        from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup

        gran = PerGroup(self.group) if self.group > 0 else PerAxis(0)
        return IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{self.bits}"),
            granularity=gran,
            mapping_type=MappingType.ASYMMETRIC,
        )

    def check(self, name: str, lin: nn.Linear) -> None:
        require_divisor(self.id, name, lin.in_features, self.group)

    def bits_per_weight(self, lin: nn.Linear, module: nn.Module) -> float:
        return effective_bits(self.bits, self.group, lin.in_features, sym=False)


@register
@dataclass(frozen=True)
class TorchAOInt8WO(_TorchAO):
    kernel: bool = False

    family = "torchao-int8wo"
    forms = ("torchao-int8wo[-kernel]",)
    examples = ("torchao-int8wo",)
    description = (
        "torchao Int8WeightOnlyConfig: int8 per output row, symmetric; -kernel keeps torchao's tensor"
    )

    def config(self, lib: Any) -> Any:
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()

    def bits_per_weight(self, lin: nn.Linear, module: nn.Module) -> float:
        return effective_bits(8, 0, lin.in_features, sym=True)


@register
@dataclass(frozen=True)
class TorchAOW8A8(_TorchAO):
    family = "torchao-w8a8"
    forms = ("torchao-w8a8",)
    examples = ("torchao-w8a8",)
    description = (
        "torchao Int8DynamicActivationInt8WeightConfig: int8 per-row symmetric weights, dynamic per-token "
        "symmetric int8 activations; always kernel mode (torchao's tensor subclass stays in the forward)"
    )

    @property
    def keeps_library_modules(self) -> bool:
        return True

    def config(self, lib: Any) -> Any:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return Int8DynamicActivationInt8WeightConfig()

    def bits_per_weight(self, lin: nn.Linear, module: nn.Module) -> float:
        return effective_bits(8, 0, lin.in_features, sym=True)
