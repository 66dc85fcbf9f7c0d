"""Weight-activation quantization: `w{b}a{c}` and SmoothQuant (`smoothquant-w{b}a{c}-a{alpha}`).

Weights: per-output-channel symmetric round-to-nearest (`fake_quant_groups(w, b, 0, sym=True)`).
Activations: the input of every targeted Linear is fake-quantized per token, symmetric and dynamic
(`fake_quant_per_token`). Each target `nn.Linear` is replaced by an `ActQuantLinear` — a subclass of
`nn.Linear` that shares the original weight and bias — so the model still lists Linears, prints what was
done, and deep-copies cleanly (no closures over modules). Weights take 2..8 bits, activations 2..16.

SmoothQuant folds s_j = max|X_j|^α / max|W_:,j|^(1−α) exactly into the op that produces X, then quantizes.
Folds done on Llama-style blocks (see `smooth_`):
  * input_layernorm ÷ s, q/k/v_proj columns × s (one s from the stacked q/k/v weights);
  * post_attention_layernorm ÷ s, gate/up_proj columns × s;
  * v_proj rows ÷ s, o_proj columns × s, with s shared by the query heads of one KV head (GQA-exact);
  * up_proj rows ÷ s, down_proj columns × s (down's input is act(gate)·up, linear in up's output).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lcc_harness.errors import MethodError
from lcc_harness.methods._calib import InputStats, collect_input_stats
from lcc_harness.methods._outliers import OutlierSnapshot, OutlierTally
from lcc_harness.methods._quant import effective_bits, fake_quant_groups, fake_quant_per_token
from lcc_harness.methods.registry import CompressContext, Method, param, register

W_BITS = (2, 8)
A_BITS = (2, 16)
ALPHA_RANGE = (0.01, 1.0)
_EPS = 1e-5


class ActQuantizer(nn.Module):
    """Symmetric dynamic per-token fake quantization of (..., features) to `bits`; same shape and dtype.

    A module of its own so that a forward hook on it sees the quantized activations.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = int(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_per_token(x, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per-token, symmetric"


class ActQuantLinear(nn.Linear):
    """An nn.Linear whose input goes through `input_quant` (an ActQuantizer) before the matmul."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        act_bits: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.input_quant = ActQuantizer(act_bits)

    @classmethod
    def from_linear(cls, lin: nn.Linear, act_bits: int) -> ActQuantLinear:
        """A new module sharing `lin`'s weight and bias Parameters (no copy)."""
        new = cls(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            act_bits=act_bits,
            device="meta",
            dtype=lin.weight.dtype,
        )
        new.weight = lin.weight
        new.bias = lin.bias
        new.train(lin.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x), self.weight, self.bias)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def quantize_weights_acts_(
    model: nn.Module,
    linears: list[tuple[str, nn.Linear]],
    w_bits: int,
    a_bits: int,
    outliers: OutlierTally | None = None,
) -> dict[str, float]:
    """Per-channel symmetric `w_bits` weights and per-token `a_bits` inputs on `linears`, in place.

    Returns facts for reports: mean effective weight bits (with one fp16 scale per row) and a_bits. `outliers`
    (if given) collects the outlier weights the rounding zeroed or moved, each matrix compared with itself just
    before its rounding.
    """
    n_w = n_bits = 0.0
    for name, lin in linears:
        snap = OutlierSnapshot.take(name, lin.weight) if outliers is not None else None
        lin.weight.copy_(fake_quant_groups(lin.weight, w_bits, 0, sym=True))
        if snap is not None:
            outliers.add(len(snap), snap.changes(lin.weight))
        if isinstance(lin, ActQuantLinear):
            lin.input_quant.bits = a_bits
        else:
            _set_submodule(model, name, ActQuantLinear.from_linear(lin, a_bits))
        n_w += lin.weight.numel()
        n_bits += lin.weight.numel() * effective_bits(w_bits, 0, lin.in_features, sym=True)
    return {
        "effective_bits": n_bits / max(n_w, 1),
        "act_bits": float(a_bits),
        "act_quant_linears": len(linears),
    }


@register
@dataclass(frozen=True)
class WeightActQuant(Method):
    """Per-channel symmetric weights and per-token symmetric dynamic activations (inputs of the Linears)."""

    w_bits: int = param(8, *W_BITS, "weight bits")
    a_bits: int = param(8, *A_BITS, "activation bits")

    family = "act-quant"
    forms = ("w{w_bits}a{a_bits}",)
    examples = ("w8a8", "w4a8", "w4a4")
    description = (
        "weight-activation quantization: weights per output channel, symmetric, 2-8 bits; "
        "Linear inputs per token, symmetric, dynamic, 2-16 bits"
    )

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        tally = OutlierTally()
        ctx.info.update(quantize_weights_acts_(model, ctx.linears(model), self.w_bits, self.a_bits, tally))
        tally.record(ctx.info)
        return model


# --------------------------------------------------------------------------------------------- smoothing

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class _Block:
    """One Llama-style decoder block, by qualified name prefix."""

    prefix: str
    module: nn.Module

    def lin(self, part: str, proj: str) -> tuple[str, nn.Linear]:
        return f"{self.prefix}.{part}.{proj}", getattr(getattr(self.module, part), proj)


def _llama_blocks(model: nn.Module) -> list[_Block]:
    """Every block with self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj and the two norms; else MethodError."""
    blocks = []
    for name, mod in model.named_modules():
        if not (hasattr(mod, "self_attn") and hasattr(mod, "mlp")):
            continue
        missing = [
            f"self_attn.{p}" for p in _ATTN if not isinstance(getattr(mod.self_attn, p, None), nn.Linear)
        ]
        missing += [f"mlp.{p}" for p in _MLP if not isinstance(getattr(mod.mlp, p, None), nn.Linear)]
        missing += [n for n in ("input_layernorm", "post_attention_layernorm") if not hasattr(mod, n)]
        if missing or hasattr(mod, "pre_feedforward_layernorm"):
            why = (
                f"lacks {', '.join(missing)}" if missing else "has sandwich norms (pre_feedforward_layernorm)"
            )
            raise MethodError(
                f"smoothquant supports Llama-style blocks only; block '{name}' of "
                f"{type(model).__name__} {why}; use w{{b}}a{{c}} without smoothing instead"
            )
        blocks.append(_Block(name, mod))
    if not blocks:
        raise MethodError(
            f"smoothquant supports Llama-style blocks only (self_attn.q/k/v/o_proj, "
            f"mlp.gate/up/down_proj, input_layernorm, post_attention_layernorm); "
            f"{type(model).__name__} has none; use w{{b}}a{{c}} without smoothing instead"
        )
    return blocks


def smoothing_consumers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linears whose input statistics `smooth_` needs (one per distinct input: q, o, gate, down)."""
    out = []
    for b in _llama_blocks(model):
        out += [
            b.lin("self_attn", "q_proj"),
            b.lin("self_attn", "o_proj"),
            b.lin("mlp", "gate_proj"),
            b.lin("mlp", "down_proj"),
        ]
    return out


def _absmax(stats: Mapping[str, InputStats | torch.Tensor], names: list[str]) -> torch.Tensor | None:
    """Elementwise max of the calibration input abs-maxima (in,) over those of `names` that have stats."""
    found = [stats[n] for n in names if n in stats]
    if not found:
        return None
    vals = [(s.absmax if isinstance(s, InputStats) else s).float().cpu() for s in found]
    return torch.stack(vals).amax(0)


def smoothing_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = a^α / w^(1−α) per channel (float32); channels never active or with zero weights keep s = 1."""
    a = act_absmax.float()
    w = w_absmax.float()
    s = a.clamp(min=_EPS).pow(alpha) / w.clamp(min=_EPS).pow(1 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp(min=_EPS), torch.ones_like(s))


def _scale_cols_(lin: nn.Linear, s: torch.Tensor) -> None:
    lin.weight.copy_((lin.weight.float() * s.to(lin.weight.device)).to(lin.weight.dtype))


def _scale_rows_(lin: nn.Linear, inv: torch.Tensor) -> None:
    inv = inv.to(lin.weight.device)
    lin.weight.copy_((lin.weight.float() * inv[:, None]).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.float() * inv).to(lin.bias.dtype))


def _fold_into_norm_(norm: nn.Module, s: torch.Tensor, where: str) -> None:
    """norm.weight ÷ s (and bias, if any), after checking on a copy that the output scales by exactly 1/s."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.shape != s.shape:
        raise MethodError(
            f"smoothquant: '{where}' has no per-channel weight of width {s.numel()}; "
            "this architecture is not supported"
        )
    s = s.to(w.device)

    def fold(m: nn.Module) -> None:
        m.weight.copy_((m.weight.float() / s).to(m.weight.dtype))
        if getattr(m, "bias", None) is not None:
            m.bias.copy_((m.bias.float() / s).to(m.bias.dtype))

    probe = copy.deepcopy(norm)
    fold(probe)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(4, s.numel(), generator=g).to(device=w.device, dtype=w.dtype)  # (4, H)
    want, got = norm(x).float() / s, probe(x).float()
    tol = 1e-4 if w.dtype == torch.float32 else 2e-2
    err = ((got - want).norm() / want.norm().clamp(min=1e-12)).item()
    if not err <= tol:  # also catches NaN
        raise MethodError(
            f"smoothquant: '{where}' ({type(norm).__name__}) does not scale linearly with its "
            f"weight (relative error {err:.2g}); this architecture is not supported"
        )
    fold(norm)


def _head_layout(attn: nn.Module, v: nn.Linear, o: nn.Linear) -> tuple[int, int, int] | None:
    """(kv heads, query heads per kv head, head_dim) when v_proj rows map onto o_proj columns; else None."""
    hd = getattr(attn, "head_dim", None) or getattr(getattr(attn, "config", None), "head_dim", None)
    if not hd or v.out_features % hd or o.in_features % hd:
        return None
    n_kv, n_q = v.out_features // hd, o.in_features // hd
    if n_kv == 0 or n_q % n_kv:
        return None
    return n_kv, n_q // n_kv, hd


@torch.no_grad()
def smooth_(
    model: nn.Module,
    stats: Mapping[str, InputStats | torch.Tensor],
    alpha: float = 0.5,
    targets: Collection[str] | None = None,
) -> dict[str, int]:
    """Fold SmoothQuant scales into a Llama-style model in place; the function it computes is unchanged.

    stats: Linear name → InputStats (or its (in,) absmax) from calibration of the UNsmoothed model.
    targets: smooth only groups with a consumer among these Linear names (None = all).
    Returns how many groups of each kind were smoothed: qkv, o_proj, gate_up, down_proj.
    """
    done = {"qkv": 0, "o_proj": 0, "gate_up": 0, "down_proj": 0}

    def wanted(names: list[str]) -> bool:
        return targets is None or any(n in targets for n in names)

    for b in _llama_blocks(model):
        attn, mlp = b.module.self_attn, b.module.mlp
        # q/k/v ← input_layernorm
        names = [b.lin("self_attn", p)[0] for p in ("q_proj", "k_proj", "v_proj")]
        a = _absmax(stats, names)
        if a is not None and wanted(names):
            lins = [attn.q_proj, attn.k_proj, attn.v_proj]
            w = torch.cat([lin.weight.float().abs() for lin in lins]).amax(0)  # (H,)
            s = smoothing_scales(a, w.cpu(), alpha)
            _fold_into_norm_(b.module.input_layernorm, s, f"{b.prefix}.input_layernorm")
            for lin in lins:
                _scale_cols_(lin, s)
            done["qkv"] += 1
        # o ← v (per kv head: every query head of one group shares the scale)
        name_o = b.lin("self_attn", "o_proj")[0]
        a = _absmax(stats, [name_o])
        layout = _head_layout(attn, attn.v_proj, attn.o_proj)
        if a is not None and layout is not None and wanted([name_o]):
            n_kv, rep, hd = layout
            w = attn.o_proj.weight.float().abs().amax(0)  # (n_q*hd,)
            a_g = a.view(n_kv, rep, hd).amax(1)  # (n_kv, hd)
            w_g = w.cpu().view(n_kv, rep, hd).amax(1)
            s_g = smoothing_scales(a_g, w_g, alpha)  # (n_kv, hd)
            _scale_rows_(attn.v_proj, 1.0 / s_g.reshape(-1))
            _scale_cols_(attn.o_proj, s_g[:, None, :].expand(n_kv, rep, hd).reshape(-1))
            done["o_proj"] += 1
        # gate/up ← post_attention_layernorm
        names = [b.lin("mlp", p)[0] for p in ("gate_proj", "up_proj")]
        a = _absmax(stats, names)
        if a is not None and wanted(names):
            w = torch.cat([mlp.gate_proj.weight.float().abs(), mlp.up_proj.weight.float().abs()]).amax(0)
            s = smoothing_scales(a, w.cpu(), alpha)
            _fold_into_norm_(b.module.post_attention_layernorm, s, f"{b.prefix}.post_attention_layernorm")
            _scale_cols_(mlp.gate_proj, s)
            _scale_cols_(mlp.up_proj, s)
            done["gate_up"] += 1
        # down ← up rows (down's input is act(gate(x)) · up(x))
        name_d = b.lin("mlp", "down_proj")[0]
        a = _absmax(stats, [name_d])
        if a is not None and wanted([name_d]):
            s = smoothing_scales(a, mlp.down_proj.weight.float().abs().amax(0).cpu(), alpha)
            _scale_rows_(mlp.up_proj, 1.0 / s)
            _scale_cols_(mlp.down_proj, s)
            done["down_proj"] += 1
    return done


@register
@dataclass(frozen=True)
class SmoothQuant(Method):
    """SmoothQuant: exact per-channel smoothing from calibration abs-maxima, then w{b}a{c} on all targets."""

    alpha: float = param(0.5, *ALPHA_RANGE)
    w_bits: int = param(8, *W_BITS, "weight bits")
    a_bits: int = param(8, *A_BITS, "activation bits")

    family = "smoothquant"
    # ids always carry -a{alpha}; on input it may be left out (then alpha = 0.5)
    forms = ("smoothquant-w{w_bits}a{a_bits}-a{alpha}", "smoothquant-w{w_bits}a{a_bits}")
    examples = ("smoothquant-w8a8-a0.5", "smoothquant-w8a8-a0.75", "smoothquant-w4a8-a0.5")
    description = (
        "SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1-alpha) folded exactly into the "
        "preceding norm / v_proj / up_proj of Llama-style blocks, then w{b}a{c}; alpha in "
        "[0.01, 1], default 0.5"
    )
    needs_calibration: ClassVar[bool] = True

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        from lcc_harness.measure.head import final_hidden

        consumers = smoothing_consumers(model)  # raises MethodError on unsupported architectures
        if not ctx.calibration:
            raise MethodError(f"{self.id} needs calibration spans, but the context has none")
        stats = collect_input_stats(model, consumers, ctx.calibration)
        probe = ctx.calibration[0][:64]
        before = final_hidden(model, probe).float()  # (T, H)
        targets = {name for name, _ in ctx.linears(model)}
        done = smooth_(model, stats, self.alpha, targets)
        err = ((final_hidden(model, probe).float() - before).norm() / before.norm().clamp(min=1e-12)).item()
        dtype = next(model.parameters()).dtype
        tol = 1e-3 if dtype == torch.float32 else 0.25
        if not err <= tol:  # also catches NaN
            raise MethodError(
                f"smoothquant: smoothing changed the model's output (relative error {err:.3g} "
                f"> {tol}); {type(model).__name__} is not Llama-style enough to fold into"
            )
        ctx.info.update({f"smoothed_{k}": v for k, v in done.items()})
        ctx.info["smoothing_rel_error"] = err
        # outliers of the smoothed weights: smoothing is exact (checked above), the rounding is the lossy step
        tally = OutlierTally(note="relative to the smoothed weights (smoothing itself is exact)")
        ctx.info.update(quantize_weights_acts_(model, ctx.linears(model), self.w_bits, self.a_bits, tally))
        tally.record(ctx.info)
        return model
