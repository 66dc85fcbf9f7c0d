"""The outlier record in method_info, wired into the generic WeightMethod traversal, GPTQ and act/SmoothQuant: a
planted super weight is flagged when a method zeroes it and not when it leaves it alone."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lcc_harness.methods import CompressContext, parse_method
from lcc_harness.methods import act as act_mod
from lcc_harness.methods import gptq as gptq_mod
from lcc_harness.methods._outliers import K_SUPER
from lcc_harness.methods.registry import WeightMethod

LAYER = "model.layers.1.mlp.down_proj"


def calib() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randint(0, 256, (64,), generator=g) for _ in range(2))


def plant(model: nn.Module, where: list[tuple[int, int]], z: float = 40.0) -> nn.Module:
    """A copy of `model` whose LAYER weight holds mean + z·std at each (row, col) (a planted super weight)."""
    model = copy.deepcopy(model)
    w = model.get_submodule(LAYER).weight
    with torch.no_grad():
        mean, std = float(w.mean()), float(w.std())
        for r, c in where:
            w[r, c] = mean + z * std
    return model


def zeroed_and_kept(model: nn.Module, method_id: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """A position of LAYER the method zeroes and one it keeps (random pruning: the mask ignores the weights)."""
    out = parse_method(method_id).apply(copy.deepcopy(model), CompressContext())
    w = out.get_submodule(LAYER).weight
    zero, kept = torch.nonzero(w == 0)[0].tolist(), torch.nonzero(w != 0)[0].tolist()
    return (zero[0], zero[1]), (kept[0], kept[1])


def test_random_pruning_that_hits_a_super_weight_flags_it(tiny: nn.Module) -> None:
    hit, miss = zeroed_and_kept(tiny, "random-s10-seed3")
    model = plant(tiny, [hit, miss])
    ctx = CompressContext()
    parse_method("random-s10-seed3").apply(model, ctx)
    o = ctx.info["outliers"]
    assert o["total"] == 2 and o["changed"] == o["zeroed"] == o["super_zeroed"] == 1
    (s,) = ctx.info["super_weights_zeroed"]
    assert (s["layer"], s["row"], s["col"], s["after"]) == (LAYER, *hit, 0.0)
    assert s["sigma"] > K_SUPER and s["zeroed"]
    assert o["top"] == [s]


def test_untouched_super_weight_not_flagged(tiny: nn.Module) -> None:
    _, miss = zeroed_and_kept(tiny, "random-s10-seed3")
    ctx = CompressContext()
    parse_method("random-s10-seed3").apply(plant(tiny, [miss]), ctx)
    assert ctx.info["outliers"]["total"] == 1 and ctx.info["outliers"]["changed"] == 0
    assert ctx.info["super_weights_zeroed"] == []


@pytest.mark.parametrize("method_id", ["rtn-w3-g32", "mixed-w3-g32-p2", "magnitude-s50", "w8a8"])
def test_methods_that_keep_extremes_flag_nothing(tiny: nn.Module, method_id: str) -> None:
    ctx = CompressContext()
    parse_method(method_id).apply(plant(tiny, [(3, 5)]), ctx)
    assert ctx.info["outliers"]["total"] == 1 and ctx.info["outliers"]["changed"] == 0


def test_none_records_nothing(tiny: nn.Module) -> None:
    ctx = CompressContext()
    parse_method("none").apply(plant(tiny, [(3, 5)]), ctx)
    assert "outliers" not in ctx.info and "super_weights_zeroed" not in ctx.info


@dataclass(frozen=True)
class ZeroOne(WeightMethod):
    """A test method (not registered): zeroes LAYER[3, 5] in `transform`."""

    family = "zero-one"

    def transform(self, name: str, lin: nn.Linear, ctx: CompressContext, state: None) -> None:
        if name == LAYER:
            lin.weight[3, 5] = 0


def test_any_weight_method_gets_the_record_from_the_traversal(tiny: nn.Module) -> None:
    ctx = CompressContext()
    ZeroOne().apply(plant(tiny, [(3, 5), (7, 9)]), ctx)
    assert [(s["row"], s["col"]) for s in ctx.info["super_weights_zeroed"]] == [(3, 5)]
    assert ctx.info["outliers"]["total"] == 2


def test_gptq_wiring_sees_a_zeroed_outlier(tiny: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    real = gptq_mod.gptq_quantize

    def zeroing(W, H, *args, **kw):  # GPTQ as usual, then the planted position zeroed in LAYER's shape
        q = real(W, H, *args, **kw)
        if W.shape == tiny.get_submodule(LAYER).weight.shape and bool((W.abs() > 20 * W.std()).any()):
            q[3, 5] = 0
        return q

    monkeypatch.setattr(gptq_mod, "gptq_quantize", zeroing)
    ctx = CompressContext(calibration=calib())
    parse_method("gptq-w4-g32").apply(plant(tiny, [(3, 5)]), ctx)
    assert [(s["layer"], s["row"], s["col"]) for s in ctx.info["super_weights_zeroed"]] == [(LAYER, 3, 5)]


def test_gptq_keeps_the_planted_weight(tiny: nn.Module) -> None:
    ctx = CompressContext(calibration=calib())
    parse_method("gptq-w4-g32").apply(plant(tiny, [(3, 5)]), ctx)
    assert ctx.info["outliers"]["total"] == 1 and ctx.info["super_weights_zeroed"] == []


@pytest.mark.parametrize("method_id", ["w8a8", "smoothquant-w8a8-a0.5"])
def test_act_wiring_sees_a_zeroed_outlier(
    tiny: nn.Module, monkeypatch: pytest.MonkeyPatch, method_id
) -> None:
    real = act_mod.fake_quant_groups

    def zeroing(w, *args, **kw):  # the rounding, then whatever is beyond 20σ of the matrix zeroed
        q = real(w, *args, **kw)
        return q.masked_fill((w - w.mean()).abs() > 20 * w.std(), 0)

    monkeypatch.setattr(act_mod, "fake_quant_groups", zeroing)
    # SmoothQuant compares each matrix after its (exact) smoothing; smoothing divides a column's outlier down
    # to the column's level, so here it is a no-op to keep the planted weight an outlier for the rounding
    monkeypatch.setattr(act_mod, "smooth_", lambda *a, **k: {})
    ctx = CompressContext(calibration=calib())
    parse_method(method_id).apply(plant(tiny, [(3, 5)], z=60.0), ctx)
    got = [(s["layer"], s["row"], s["col"]) for s in ctx.info["super_weights_zeroed"]]
    assert got == [(LAYER, 3, 5)]
