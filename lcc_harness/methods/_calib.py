"""Calibration helpers: run calibration spans through a model and collect per-Linear input statistics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class InputStats:
    """Statistics of the inputs X (tokens × in_features) one Linear saw during calibration."""

    sq_sum: torch.Tensor  # (in,) float64, Σ_tokens x_j²  (so ‖X_j‖₂ = sq_sum.sqrt())
    absmax: torch.Tensor  # (in,) float32, max_tokens |x_j|
    n_tokens: int

    @property
    def col_norm(self) -> torch.Tensor:
        """(in,) float32: ‖X_j‖₂ over calibration tokens, as Wanda uses it."""
        return self.sq_sum.sqrt().float()


@torch.no_grad()
def run_calibration(model: nn.Module, calibration: Sequence[torch.Tensor]) -> None:
    """Forward every calibration span (T,) through the model body (no LM head, no cache)."""
    from lcc_harness.measure.head import decoder_of

    dev = model.get_input_embeddings().weight.device
    body = decoder_of(model)
    for ids in calibration:
        body(input_ids=ids.view(1, -1).to(dev), use_cache=False)


@torch.no_grad()
def collect_input_stats(
    model: nn.Module, linears: Sequence[tuple[str, nn.Linear]], calibration: Sequence[torch.Tensor]
) -> dict[str, InputStats]:
    """One calibration pass with forward pre-hooks on `linears`; returns name → InputStats."""
    if not calibration:
        from lcc_harness.errors import MethodError

        raise MethodError(
            "this method needs calibration spans, but none were given; pass calibration "
            "(RunConfig.calib_samples > 0)"
        )
    stats: dict[str, InputStats] = {}
    hooks = []

    def make_hook(name: str, lin: nn.Linear):
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, lin.in_features)  # (tokens, in)
            st = stats.get(name)
            sq = x.double().pow(2).sum(0).cpu()
            am = x.float().abs().amax(0).cpu()
            if st is None:
                stats[name] = InputStats(sq, am, x.shape[0])
            else:
                st.sq_sum += sq
                st.absmax = torch.maximum(st.absmax, am)
                st.n_tokens += x.shape[0]

        return hook

    try:
        for name, lin in linears:
            hooks.append(lin.register_forward_pre_hook(make_hook(name, lin)))
        run_calibration(model, calibration)
    finally:
        for h in hooks:
            h.remove()
    return stats


def layer_stats(
    method_id: str,
    model: nn.Module,
    linears: Sequence[tuple[str, nn.Linear]],
    calibration: Sequence[torch.Tensor],
) -> dict[str, InputStats]:
    """`collect_input_stats` for a method that needs every target's input statistics: no calibration spans, or a
    target the calibration forward never reached, is a MethodError naming the method and what to do."""
    from lcc_harness.errors import MethodError

    if not calibration:
        raise MethodError(
            f"method '{method_id}' needs calibration spans, but the context has none; run it through the "
            "harness (which draws them) or pass CompressContext(calibration=...)"
        )
    stats = collect_input_stats(model, linears, calibration)
    missing = [name for name, _ in linears if name not in stats]
    if missing:
        raise MethodError(
            f"method '{method_id}': calibration never reached target Linear(s) {', '.join(missing[:3])}; "
            "exclude those layers from the targets"
        )
    return stats
