"""Outlier weights a method changed: which weights far out in their matrix's distribution were zeroed or moved.

An outlier is a weight beyond K_SIGMA standard deviations of its own weight matrix, |w − mean| > K_SIGMA · std
(mean and std over the whole matrix, float32). K_SIGMA = 10: a Gaussian weight passes 10σ with probability
1.5 × 10⁻²³, so in any model every weight beyond it belongs to the heavy tail that LLM weights really have, and
the list stays short (SmolLM2-135M: see README, *Outlier weights*). A method *changed* an outlier when it zeroed
it or moved it by more than MOVED_FRAC of its value, |after − before| > 0.5 · |before|: round-to-nearest of a
matrix's extreme with a min–max grid moves it by at most half a step, well below half the value at ≥ 2 bits
(the extreme sets the range), so what is flagged was clipped, pruned or sign-flipped rather than rounded.

A *super weight* is a zeroed weight beyond K_SUPER = 20σ: half the ≈30σ pair known to matter in SmolLM2
(`model.layers.11.mlp.down_proj`, row 507, columns 1229 and 1487), so such a weight is caught with margin, while
the 10–20σ band holds the ordinary heavy tail that pruning at random removes by the hundred. Zeroing one is
flagged in `method_info["super_weights_zeroed"]` and as a warning in the report (the "super weight" of Yu et al.
2024: removing one such weight can destroy a model).

`changed_outliers(name, before, after)` is the pure definition. Methods that rewrite weights in place take an
`OutlierSnapshot` of each target first (only the outlier positions and values, on the host: a few numbers per
matrix, never a copy of the model) and compare it with the weights afterwards (`OutlierWatch`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

K_SIGMA = 10.0  # an outlier: |w − mean| > K_SIGMA · std of its matrix
K_SUPER = 20.0  # a zeroed weight beyond this many σ is a super weight zeroed
MOVED_FRAC = 0.5  # changed: zeroed, or |after − before| > MOVED_FRAC · |before|
TOP = 8  # changed outliers kept in method_info, largest |before| first
MAX_SUPER = 32  # super weights listed at most (all are counted)


@dataclass(frozen=True)
class OutlierChange:
    """One changed outlier: layer name, (row, col) index in its (out, in) weight, value before and after,
    and its distance from the matrix mean in standard deviations."""

    layer: str
    row: int
    col: int
    before: float
    after: float
    sigma: float

    @property
    def zeroed(self) -> bool:
        return self.after == 0.0 and self.before != 0.0

    @property
    def super_zeroed(self) -> bool:
        return self.zeroed and self.sigma > K_SUPER

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "zeroed": self.zeroed}


@dataclass(frozen=True)
class OutlierSnapshot:
    """The outliers of one weight matrix before a method ran: positions (N, 2) int64 (row, col), values (N,)
    float32 and sigmas (N,), on the host."""

    layer: str
    index: torch.Tensor
    values: torch.Tensor
    sigmas: torch.Tensor

    @classmethod
    @torch.no_grad()
    def take(cls, layer: str, weight: torch.Tensor, k: float = K_SIGMA) -> OutlierSnapshot:
        """Outliers of `weight` (out, in), any dtype and device; |w − mean| > k · std in float32."""
        w = weight.detach().float()  # (O, I); one matrix at a time
        std, mean = torch.std_mean(w)
        std = std.clamp(min=torch.finfo(torch.float32).tiny)
        index = torch.nonzero((w - mean).abs_() > k * std).cpu()  # (N, 2)
        if index.numel():
            rows, cols = index[:, 0].to(w.device), index[:, 1].to(w.device)
            values = w[rows, cols]  # (N,)
            sigmas = ((values - mean).abs() / std).cpu()
            values = values.cpu()
        else:
            values = sigmas = torch.zeros(0)
        return cls(layer, index, values, sigmas)

    def __len__(self) -> int:
        return self.index.shape[0]

    @torch.no_grad()
    def changes(self, weight: torch.Tensor, moved: float = MOVED_FRAC) -> list[OutlierChange]:
        """The outliers `weight` (out, in), the matrix after the method, zeroed or moved by more than `moved`."""
        if not len(self):
            return []
        rows, cols = self.index[:, 0].to(weight.device), self.index[:, 1].to(weight.device)
        after = weight.detach()[rows, cols].float().cpu()  # (N,)
        hit = (after - self.values).abs() > moved * self.values.abs()  # (N,); zeroed counts as moved by 100 %
        return [
            OutlierChange(self.layer, int(r), int(c), float(b), float(a), float(s))
            for (r, c), b, a, s in zip(
                self.index[hit].tolist(),
                self.values[hit].tolist(),
                after[hit].tolist(),
                self.sigmas[hit].tolist(),
                strict=True,
            )
        ]


def changed_outliers(
    layer: str, before: torch.Tensor, after: torch.Tensor, k: float = K_SIGMA, moved: float = MOVED_FRAC
) -> list[OutlierChange]:
    """The outliers of `before` (out, in) (beyond k σ of that matrix) that `after` zeroed or moved by more
    than `moved` of their value."""
    return OutlierSnapshot.take(layer, before, k).changes(after, moved)


@dataclass
class OutlierTally:
    """Changed outliers over a model's matrices, summarized for method_info (see `record`)."""

    total: int = 0  # outliers in the matrices compared
    changed: int = 0
    zeroed: int = 0
    top: list[OutlierChange] | None = None
    supers: list[OutlierChange] | None = None
    super_count: int = 0
    note: str = ""

    def add(self, n_outliers: int, changes: Sequence[OutlierChange]) -> None:
        self.total += n_outliers
        self.changed += len(changes)
        self.zeroed += sum(c.zeroed for c in changes)
        self.top = _largest([*(self.top or []), *changes], TOP)
        sup = [c for c in changes if c.super_zeroed]
        self.super_count += len(sup)
        self.supers = _largest([*(self.supers or []), *sup], MAX_SUPER)

    def record(self, info: dict[str, Any]) -> None:
        """info['outliers'] = counts, thresholds and the TOP largest changes; info['super_weights_zeroed'] = the
        zeroed weights beyond K_SUPER σ (at most MAX_SUPER, largest first; `outliers.super_zeroed` counts all)."""
        info["outliers"] = {
            "k_sigma": K_SIGMA,
            "moved_frac": MOVED_FRAC,
            "k_super": K_SUPER,
            "total": self.total,
            "changed": self.changed,
            "zeroed": self.zeroed,
            "super_zeroed": self.super_count,
            "top": [c.to_dict() for c in self.top or []],
            **({"note": self.note} if self.note else {}),
        }
        info["super_weights_zeroed"] = [c.to_dict() for c in self.supers or []]


def _largest(changes: Iterable[OutlierChange], n: int) -> list[OutlierChange]:
    return sorted(changes, key=lambda c: (-abs(c.before), c.layer, c.row, c.col))[:n]


class OutlierWatch:
    """Snapshots of the outliers of every target before a method runs; `record` compares them with the weights
    afterwards (re-read by name, so a module replaced in place is still found) and writes method_info."""

    def __init__(self, linears: Sequence[tuple[str, nn.Module]], note: str = "") -> None:
        self.snapshots = [OutlierSnapshot.take(name, lin.weight) for name, lin in linears]
        self.note = note

    def tally(self, model: nn.Module) -> OutlierTally:
        t = OutlierTally(note=self.note)
        for snap in self.snapshots:
            t.add(len(snap), snap.changes(model.get_submodule(snap.layer).weight))
        return t

    def record(self, model: nn.Module, info: dict[str, Any]) -> None:
        self.tally(model).record(info)

    def record_weights(self, weights: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """As `record`, from the weights (out, in) after the method given by layer name: for a method whose
        modules no longer hold a float weight (a library's quantized module), its dequantized weights."""
        t = OutlierTally(note=self.note)
        for snap in self.snapshots:
            t.add(len(snap), snap.changes(weights[snap.layer]))
        t.record(info)
