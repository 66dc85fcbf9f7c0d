"""Shared fake-quantization primitives: every quantizing method goes through these.

Weights are (out_features, in_features); a group is G consecutive input channels of one output row.
Scales are computed in float32 and results cast back to the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lcc_harness.methods.registry import param

SCALE_BITS = 16  # scales (and float zero points) are counted as fp16 when reporting effective bits


def resolve_group(in_features: int, group: int, where: str = "") -> int:
    """group <= 0 means per output channel (one group per row); otherwise it must divide in_features."""
    if group <= 0:
        return in_features
    if in_features % group:
        from lcc_harness.errors import MethodError

        raise MethodError(
            f"group size {group} does not divide the input width {in_features}{where}; "
            "use a divisor of it, or per-channel (g0)"
        )
    return group


def quant_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per row of x (..., G) → (..., 1) each.

    asym: range [min(x,0), max(x,0)], s = range/(2^b-1), z = round(-min/s) in [0, 2^b-1].
    sym:  s = max|x| / (2^(b-1)-1), z = 0.
    """
    xf = x.float()
    if sym:
        qmax = 2 ** (bits - 1) - 1 if bits > 1 else 1
        s = xf.abs().amax(dim=-1, keepdim=True) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        return s, torch.zeros_like(s)
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / (2**bits - 1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.round(-lo / s).clamp(0, 2**bits - 1)
    return s, z


def quantize_dequantize(
    x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, sym: bool
) -> torch.Tensor:
    """Round x to its grid and return the dequantized float32 values."""
    xf = x.float()
    if sym:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(xf / s), lo, hi) * s
    q = torch.clamp(torch.round(xf / s) + z, 0, 2**bits - 1)
    return (q - z) * s


def fake_quant_groups(w: torch.Tensor, bits: int, group: int, sym: bool = False) -> torch.Tensor:
    """Round-to-nearest of a 2-D weight per group of `group` input channels; same shape and dtype."""
    out_f, in_f = w.shape
    g = resolve_group(in_f, group)
    wg = w.reshape(out_f, in_f // g, g)  # (O, n_groups, G)
    s, z = quant_params(wg, bits, sym)
    return quantize_dequantize(wg, s, z, bits, sym).reshape(out_f, in_f).to(w.dtype)


def fake_quant_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric dynamic quantization of activations, one scale per token (last dim); same dtype."""
    s, z = quant_params(x, bits, sym=True)
    return quantize_dequantize(x, s, z, bits, sym=True).to(x.dtype)


def effective_bits(bits: float, group: int, in_features: int, sym: bool) -> float:
    """Bits per weight including one fp16 scale per group and, if asymmetric, a `bits`-wide zero point."""
    g = in_features if group <= 0 else group
    return bits + (SCALE_BITS + (0 if sym else bits)) / g


@dataclass(frozen=True)
class GroupGrid:
    """The parameters of a group-wise integer grid (RTN's, which GPTQ rounds onto too), as method fields."""

    bits: int = param(4, 2, 8)
    group: int = param(128, 0, 1 << 20, hint="divisor of the input width, 0 = per channel")
    sym: bool = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        if "family" in cls.__dict__ and "forms" not in cls.__dict__:  # ids: <family>-w{bits}-g{group}[-sym]
            cls.forms = (f"{cls.family}-w{{bits}}-g{{group}}[-sym]",)
        super().__init_subclass__(**kwargs)
