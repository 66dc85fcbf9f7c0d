"""GPTQ (Frantar et al., 2022): weight-only quantization with second-order error feedback.

Blocks are processed in order. The inputs of block i are the calibration spans' hidden states after the
already-quantized blocks 0..i-1 (sequential). For block i, one pass of the ORIGINAL block collects the Hessian
proxy H = 2 XᵀX / n of every target Linear in it, all of its Linears are quantized, and a second pass of the
now quantized block produces the inputs of block i+1. Sharing one pass among a block's Linears (o_proj sees
the output of the unquantized q/k/v, down_proj that of the unquantized gate/up) is the common simplification
of the reference implementation; the blocks themselves are strictly sequential.
The grid is RTN's (`_quant.quant_params` / `quantize_dequantize`), so `gptq` with H = I equals `rtn`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lcc_harness.errors import MethodError
from lcc_harness.methods._calib import run_calibration
from lcc_harness.methods._outliers import OutlierWatch
from lcc_harness.methods._quant import (
    GroupGrid,
    effective_bits,
    quant_params,
    quantize_dequantize,
    resolve_group,
)
from lcc_harness.methods._targets import decoder_layers
from lcc_harness.methods.registry import CompressContext, Method, record_bits, register

DAMP = 0.01  # λ = DAMP · mean(diag H), the reference default
BLOCK_SIZE = 128  # columns per lazy batch update
_MAX_DAMP_RETRIES = 6  # each retry multiplies λ by 10 if H + λI is still not positive definite


def _block_width(group: int, block_size: int) -> int:
    """Lazy-batch width aligned with the groups: a multiple of `group` if it fits, else a divisor of it.

    Aligning guarantees that whenever a new group starts, every one of its columns has already received all
    error updates so far, so its scale and zero point come from the current weights.
    """
    if group <= block_size:
        return (block_size // group) * group
    return max(d for d in range(1, block_size + 1) if group % d == 0)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so U ᵀU = (H + λI)⁻¹), float64 (I, I); returns (U, λ used)."""
    lam = damp * torch.diagonal(H).mean().item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(_MAX_DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U, lam
        lam = lam * 10 if lam > 0 else 1e-8
    raise MethodError(
        "gptq: the calibration Hessian is not positive definite even after heavy damping; "
        "use more or longer calibration spans"
    )


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run CPU work single-threaded: the per-column updates are too small for OpenMP to pay off, and on
    busy cores its barriers made them ~20x slower than one thread (measured on SmolLM2's shapes)."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group: int,
    sym: bool = False,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """GPTQ of one weight W (O, I) given H (I, I) ∝ XᵀX of its inputs; returns dequantized float32 (O, I).

    Minimises ‖X Wᵀ − X Ŵᵀ‖² column by column with error feedback; group `group` (0 = per row) is quantized
    with RTN's grid whose scale/zero point are taken from the error-updated weights when the group starts.
    """
    n_in = W.shape[1]
    if H.shape != (n_in, n_in):
        raise ValueError(f"H must be ({n_in}, {n_in}) for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    g = resolve_group(n_in, group)
    with _one_cpu_thread(W.device):
        return _gptq_columns(W, H, bits, g, sym, damp, block_size)


def _gptq_columns(
    W: torch.Tensor, H: torch.Tensor, bits: int, g: int, sym: bool, damp: float, block_size: int
) -> torch.Tensor:
    """The column loop of `gptq_quantize`; g is the resolved group width."""
    n_in = W.shape[1]
    W = W.detach().to(torch.float32).clone()  # (O, I), updated in place with the propagated error
    H = H.detach().to(torch.float64).clone()  # (I, I)
    dead = torch.diagonal(H) == 0  # (I,) input channels never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U, _ = _inverse_cholesky(H, damp)
    U = U.to(torch.float32)
    Q = torch.zeros_like(W)
    bw = _block_width(g, block_size)
    s = z = None
    for i1 in range(0, n_in, bw):
        i2 = min(i1 + bw, n_in)
        W1 = W[:, i1:i2].clone()  # (O, B) current weights of this lazy batch
        E1 = torch.zeros_like(W1)  # (O, B) scaled errors, for the batch update of later columns
        U1 = U[i1:i2, i1:i2]  # (B, B)
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # entering a new group: params from the current (error-updated) weights
                end = col + g
                cur = W1[:, i:] if end <= i2 else torch.cat([W1[:, i:], W[:, i2:end]], dim=1)
                s, z = quant_params(cur[:, : end - col], bits, sym)  # (O, 1) each
            w = W1[:, i]  # (O,)
            q = quantize_dequantize(w.unsqueeze(1), s, z, bits, sym).squeeze(1)  # (O,)
            Q[:, col] = q
            err = (w - q) / U1[i, i]  # (O,)
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i1:i2] = W1
        if i2 < n_in:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy batch update of all later columns
    return Q


class _HessianHooks:
    """Forward pre-hooks that accumulate Σ xᵀx (float64) and the token count per Linear, in place.

    Linears fed the very same tensor in one call (q/k/v, gate/up) share the product instead of recomputing it.
    """

    def __init__(self, linears: Sequence[tuple[str, nn.Linear]]) -> None:
        self.H: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self._shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [lin.register_forward_pre_hook(self._make(name, lin)) for name, lin in linears]

    def _make(self, name: str, lin: nn.Linear) -> Callable[[nn.Module, tuple], None]:
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            hit = self._shared.get(id(x))
            if hit is not None and hit[0] is x:
                xtx = hit[1]
            else:
                xf = x.detach().reshape(-1, lin.in_features).float()  # (tokens, in)
                xtx = (xf.T @ xf).double()  # (in, in)
                self._shared[id(x)] = (x, xtx)
            tokens = x.numel() // lin.in_features
            if name in self.H:
                self.H[name] += xtx
                self.n[name] += tokens
            else:
                self.H[name] = xtx.clone()
                self.n[name] = tokens

        return hook

    def end_call(self) -> None:
        """Forget the shared products of the last forward (call after each span)."""
        self._shared.clear()

    def hessian(self, name: str) -> torch.Tensor | None:
        """H = 2 XᵀX / n (in, in) float64, or None if the Linear saw no input."""
        if name not in self.H:
            return None
        return self.H.pop(name).mul_(2.0 / max(self.n[name], 1))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._shared.clear()


class _Stop(Exception):
    """Raised by the last block's pre-hook once every block's call arguments are recorded."""


Call = tuple[tuple[Any, ...], dict[str, Any]]


def _capture_block_calls(
    model: nn.Module, layers: nn.ModuleList, calibration: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[list[Call]]]:
    """Hidden states entering block 0 per span, and the (args, kwargs) every block is called with per span.

    Blocks are replaced by pass-throughs during this pass, so it costs only the embeddings. Masks and position
    embeddings are recorded per block, which keeps models whose blocks get different masks correct.
    """
    hidden: list[torch.Tensor] = []
    calls: list[list[Call]] = [[] for _ in layers]
    last = len(layers) - 1

    def make_pre(i: int) -> Callable[..., None]:
        def pre(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if i == 0:
                hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
            calls[i].append((tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            if i == last:
                raise _Stop

        return pre

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs["hidden_states"]

    handles = [
        layer.register_forward_pre_hook(make_pre(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    saved = [layer.__dict__.get("forward") for layer in layers[:last]]  # e.g. an accelerate wrapper
    for layer in layers[:last]:
        layer.forward = passthrough
    try:
        for ids in calibration:
            with suppress(_Stop):
                run_calibration(model, [ids])
    finally:
        for h in handles:
            h.remove()
        for layer, fwd in zip(layers[:last], saved, strict=True):
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd
    if len(hidden) != len(calibration) or any(len(c) != len(calibration) for c in calls):
        raise MethodError("gptq: could not record the decoder blocks' inputs for every calibration span")
    return hidden, calls


def _run_block(layer: nn.Module, hidden: torch.Tensor, call: Call) -> torch.Tensor:
    """One block forward on recorded arguments with new hidden states (1, T, H) → (1, T, H)."""
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@register
@dataclass(frozen=True)
class GPTQ(Method, GroupGrid):
    """GPTQ weight-only quantization, bits 2-8, groups of G input channels (g0 = per channel), no act-order."""

    needs_calibration = True
    family, examples = "gptq", ("gptq-w3-g128", "gptq-w4-g128", "gptq-w4-g0-sym")
    description = (
        "GPTQ (Frantar et al. 2022): sequential per-block Hessian-aware rounding with error "
        "feedback on calibration spans; RTN's grid (bits 2-8, group G or g0 = per channel, "
        "asymmetric unless -sym); damp 1%, lazy batches of 128 columns, no act-order"
    )

    def _quantize(self, name: str, lin: nn.Linear, H: torch.Tensor | None) -> None:
        if H is None:
            raise MethodError(
                f"gptq: target Linear {name} saw no calibration input; exclude it or check "
                "that the calibration forward reaches it"
            )
        q = gptq_quantize(lin.weight, H, self.bits, self.group, self.sym, DAMP, BLOCK_SIZE)
        lin.weight.copy_(q.to(lin.weight.dtype))

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        if not ctx.calibration:
            raise MethodError(f"method '{self.id}' needs calibration spans, but none were given")
        targets = ctx.linears(model)
        for name, lin in targets:
            resolve_group(lin.in_features, self.group, f" of {name}")
        watch = OutlierWatch(targets)  # outlier positions and values only, before any block is quantized
        layers = decoder_layers(model)
        dev = model.get_input_embeddings().weight.device
        calib = [ids.to(dev) for ids in ctx.calibration]

        hidden, calls = _capture_block_calls(model, layers, calib)
        done: set[str] = set()
        for i, layer in enumerate(layers):
            inside = {id(m) for m in layer.modules()}
            block_targets = [(n, lin) for n, lin in targets if id(lin) in inside]
            if block_targets:
                hooks = _HessianHooks(block_targets)
                try:
                    for h, call in zip(hidden, calls[i], strict=True):
                        _run_block(layer, h, call)
                        hooks.end_call()
                finally:
                    hooks.remove()
                for name, lin in block_targets:
                    self._quantize(name, lin, hooks.hessian(name))
                    done.add(name)
            if i < len(layers) - 1:  # the quantized block's outputs are the next block's inputs
                hidden = [_run_block(layer, h, call) for h, call in zip(hidden, calls[i], strict=True)]
        del hidden, calls

        rest = [(n, lin) for n, lin in targets if n not in done]  # e.g. an included lm_head
        if rest:
            hooks = _HessianHooks(rest)
            try:
                for ids in calib:
                    model(input_ids=ids.view(1, -1), use_cache=False)
                    hooks.end_call()
            finally:
                hooks.remove()
            for name, lin in rest:
                self._quantize(name, lin, hooks.hessian(name))

        record_bits(
            ctx,
            [
                (lin.weight.numel(), effective_bits(self.bits, self.group, lin.in_features, self.sym))
                for _, lin in targets
            ],
        )
        ctx.info["gptq"] = {
            "damp": DAMP,
            "block_size": BLOCK_SIZE,
            "act_order": False,
            "calib_tokens": int(sum(ids.numel() for ids in calib)),
            "calib_spans": len(calib),
            "shared_block_pass": True,
        }
        watch.record(model, ctx.info)
        return model
