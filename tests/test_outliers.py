"""outliers.py: which weights count as outliers, which changes count, the tally written into method_info."""

from __future__ import annotations

import pytest
import torch

from lcc_harness.methods._outliers import (
    K_SIGMA,
    K_SUPER,
    MAX_SUPER,
    TOP,
    OutlierSnapshot,
    OutlierTally,
    changed_outliers,
)


def gaussian(rows: int = 128, cols: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))  # (O, I)


def plant(w: torch.Tensor, where: dict[tuple[int, int], float]) -> torch.Tensor:
    """Set w[r, c] = mean + z · std (mean and std of w before planting; a few plants shift them a little)."""
    w = w.clone()
    mean, std = float(w.mean()), float(w.std())
    for (r, c), z in where.items():
        w[r, c] = mean + z * std
    return w


def test_gaussian_matrix_has_no_outlier() -> None:
    w = gaussian()
    assert len(OutlierSnapshot.take("x", w)) == 0
    assert changed_outliers("x", w, torch.zeros_like(w)) == []  # zeroing everything changes no outlier


def test_zeroed_moved_and_kept_outliers() -> None:
    w = plant(gaussian(), {(1, 2): 40.0, (3, 4): -15.0, (5, 6): 13.0, (7, 8): 12.0})
    snap = OutlierSnapshot.take("layers.0.mlp.down_proj", w)
    assert len(snap) == 4 and snap.index.shape == (4, 2)  # only the outliers are kept
    after = w.clone()
    after[1, 2] = 0.0  # zeroed: a super weight (beyond K_SUPER σ)
    after[3, 4] *= 0.4  # moved by 60 %
    after[5, 6] *= 0.6  # moved by 40 %: within MOVED_FRAC, not a change
    after[7, 8] *= -1  # sign flipped: moved by 200 %
    after[0, 0] = 0.0  # an ordinary weight: never reported
    got = {(c.row, c.col): c for c in changed_outliers("layers.0.mlp.down_proj", w, after)}
    assert set(got) == {(1, 2), (3, 4), (7, 8)}
    z = got[(1, 2)]
    assert z.layer == "layers.0.mlp.down_proj" and z.zeroed and z.super_zeroed and z.after == 0.0
    assert z.before == pytest.approx(float(w[1, 2])) and z.sigma > K_SUPER
    assert not got[(3, 4)].zeroed and K_SIGMA < got[(3, 4)].sigma < K_SUPER
    assert not got[(7, 8)].super_zeroed
    assert got[(1, 2)].to_dict()["zeroed"] is True


def test_zeroed_outlier_below_k_super_is_not_a_super_weight() -> None:
    w = plant(gaussian(), {(2, 3): 15.0})
    after = w.clone()
    after[2, 3] = 0
    (c,) = changed_outliers("x", w, after)
    assert c.zeroed and not c.super_zeroed


def test_k_is_a_parameter_and_bf16_works() -> None:
    w = plant(gaussian(), {(0, 1): 8.0})
    assert changed_outliers("x", w, torch.zeros_like(w)) == []
    assert len(changed_outliers("x", w, torch.zeros_like(w), k=6.0)) == 1
    wb = plant(gaussian(), {(0, 1): 25.0}).to(torch.bfloat16)
    after = wb.clone()
    after[0, 1] = 0
    (c,) = changed_outliers("x", wb, after)
    assert c.super_zeroed


def test_tally_counts_keeps_the_largest_and_caps_lists() -> None:
    t = OutlierTally()
    big = plant(gaussian(256, 2048), {(r, r): 30.0 + r for r in range(MAX_SUPER + 5)})
    changes = changed_outliers("a", big, torch.zeros_like(big))
    t.add(len(changes) + 3, changes)  # 3 outliers untouched
    info: dict = {}
    t.record(info)
    o = info["outliers"]
    assert o["total"] == len(changes) + 3 and o["changed"] == o["zeroed"] == len(changes)
    assert o["super_zeroed"] == MAX_SUPER + 5 and len(info["super_weights_zeroed"]) == MAX_SUPER
    assert len(o["top"]) == TOP
    before = [abs(c["before"]) for c in o["top"]]
    assert before == sorted(before, reverse=True) and o["top"][0]["row"] == MAX_SUPER + 4
    assert (o["k_sigma"], o["k_super"]) == (K_SIGMA, K_SUPER)


def test_empty_tally_records_zero_counts() -> None:
    info: dict = {}
    OutlierTally().record(info)
    assert info["outliers"]["total"] == info["outliers"]["changed"] == 0
    assert info["outliers"]["top"] == [] and info["super_weights_zeroed"] == []
