"""Error anatomy: where a compressed model's error sits, per layer and per position.

For one sample of length T, per decoder layer l and position t, the relative error

    e_l(t) = ‖x_cmp,l(t) − x_ref,l(t)‖₂ / ‖x_ref,l(t)‖₂

of three quantities x: the residual stream after layer l (the layer's output), and the layer's keys and values as
the K and V projections output them (`k_proj` / `v_proj`, all KV heads of the layer concatenated). The norms run
over the hidden (or K/V) dimension. Per-position errors are summed into log2 position buckets [0, 1), [1, 2),
[2, 4), [4, 8), … (the last one ends at T) and reported as bucket means, pooled over samples.

Keys before rotary embedding: RoPE rotates each 2-channel pair of a key by an angle that depends only on the
position, the same for both models, so ‖R_t k_cmp − R_t k_ref‖ = ‖k_cmp − k_ref‖ and ‖R_t k_ref‖ = ‖k_ref‖: the
per-position relative error is the same before and after RoPE (up to float rounding), and the projections'
outputs are reachable with forward hooks on every Llama-like model without touching its attention code. What
these hooks do not see: a method that quantizes the KV cache inside attention (the `kv` family) — its own noise
is after `k_proj`, so its K/V rows show only the error that reaches them from upstream; the residual stream
shows the effect of both.

The reference side is captured once per sample (`capture`: every quantity at every layer, on the CPU, `Stored`
at 2 bytes a value: per row its largest |value| in float32 and the row divided by it in float16); the compressed
side is compared on the fly (`compare_to`: hooks that round its output the same way, subtract the stored
reference and keep only the bucket sums), so no second copy of activations is ever held. The rounding (at most
2⁻¹¹ of a row's largest value, on both sides alike, so identical rows still give exactly 0) puts a floor of about
3e-4 under the relative errors it can resolve; it halves the reference's memory, which at 8192 positions of
SmolLM2 is 30 layers × 8192 × (576 + 2 · 192) values: 450 MiB instead of 900.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

QUANTITIES = ("residual", "k", "v")
KEYS_NOTE = "k_proj / v_proj outputs (keys before RoPE: the per-position relative error is RoPE-invariant)"


@dataclass(frozen=True)
class Stored:
    """A (T, D) activation at 2 bytes a value: `scale` (T, 1) float32, each row's largest |value| (at least the
    smallest normal float32), and `q` (T, D) float16, the row divided by it (within [−1, 1])."""

    scale: torch.Tensor
    q: torch.Tensor

    @classmethod
    def pack(cls, y: torch.Tensor, device: str | torch.device | None = None) -> Stored:
        y = y.detach().float()
        scale = y.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        q = (y / scale).half()
        return cls(scale.to(device or y.device), q.to(device or y.device))

    def unpack(self, device: str | torch.device | None = None) -> torch.Tensor:
        """(T, D) float32 on `device` (default: where it is stored)."""
        return self.q.to(device or self.q.device).float().mul_(self.scale.to(device or self.q.device))

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


Captured = dict[str, list[Stored]]  # quantity → per layer (T, D) reference activations on CPU


def bucket_edges(T: int) -> list[tuple[int, int]]:
    """Log2 position buckets covering [0, T): [0, 1), [1, 2), [2, 4), [4, 8), …, the last one ending at T."""
    edges = [(0, 1)] if T > 0 else []
    lo = 1
    while lo < T:
        edges.append((lo, min(2 * lo, T)))
        lo *= 2
    return edges


def bucket_index(T: int) -> torch.Tensor:
    """(T,) int64: the bucket of each position (0 for t = 0, else floor(log2 t) + 1)."""
    idx = torch.empty(T, dtype=torch.int64)
    for b, (lo, hi) in enumerate(bucket_edges(T)):
        idx[lo:hi] = b
    return idx


def relative_error(x_cmp: torch.Tensor, x_ref: torch.Tensor) -> torch.Tensor:
    """(T, D), (T, D) → (T,) float32: ‖x_cmp − x_ref‖₂ / ‖x_ref‖₂ per row (0 where both are 0, inf where only
    the reference row is 0)."""
    r = x_ref.float()
    d = torch.linalg.vector_norm(x_cmp.float() - r, dim=-1)  # (T,)
    n = torch.linalg.vector_norm(r, dim=-1)  # (T,)
    return torch.where(
        n > 0, d / n.clamp_min(torch.finfo(torch.float32).tiny), torch.where(d > 0, math.inf, 0.0)
    )


def bucket_sums(values: torch.Tensor, index: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """(T,) values, (T,) bucket index → (n_buckets,) float64 sums of the values in each bucket."""
    return torch.zeros(n_buckets, dtype=torch.float64).index_add_(0, index, values.detach().cpu().double())


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from lcc_harness.measure.head import decoder_of

    body = decoder_of(model)
    for name in ("layers", "h", "blocks"):  # Llama-like, GPT-2, others
        layers = getattr(body, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return list(layers)
    raise TypeError(f"{type(model).__name__} has no list of decoder layers (`layers`, `h` or `blocks`)")


def probes(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Quantity → the module per decoder layer whose output it is: the layers themselves (residual) and, when
    every layer has them, their `k_proj` / `v_proj` (a model with fused QKV projections gets residual only)."""
    layers = _decoder_layers(model)
    out: dict[str, list[nn.Module]] = {"residual": layers}
    for q in ("k", "v"):
        mods = [
            next((m for n, m in layer.named_modules() if n.endswith(f"{q}_proj")), None) for layer in layers
        ]
        if all(m is not None for m in mods):
            out[q] = mods
    return out


def _output(out: Any) -> torch.Tensor:
    """A module's output tensor (decoder layers of some families return a tuple whose first item it is)."""
    y = out[0] if isinstance(out, tuple) else out
    return y[0]  # (T, D): batch of one


@contextlib.contextmanager
def _hooks(model: nn.Module, fn: Any) -> Iterator[None]:
    handles = [
        mod.register_forward_hook(lambda _m, _a, out, q=q, k=k: fn(q, k, _output(out)))
        for q, mods in probes(model).items()
        for k, mod in enumerate(mods)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture(model: nn.Module) -> Iterator[Captured]:
    """While active, every forward of `model` (batch of one) stores each quantity's output per layer on the CPU
    (`Stored`, (T, D)); the dict yielded holds them after the forward."""
    got: Captured = {q: [None] * len(mods) for q, mods in probes(model).items()}

    def keep(q: str, k: int, y: torch.Tensor) -> None:
        got[q][k] = Stored.pack(y, "cpu")

    with _hooks(model, keep):
        yield got


@dataclass
class Anatomy:
    """Bucket means of per-position relative errors, pooled over samples: `error[q][l][b]` for quantity q
    (QUANTITIES present), decoder layer l and bucket b ([lo, hi) = buckets[b], counts[b] positions in all)."""

    length: int
    samples: int
    buckets: list[tuple[int, int]]
    counts: list[int]
    error: dict[str, list[list[float]]]
    keys: str = KEYS_NOTE

    @property
    def layers(self) -> int:
        return len(self.error["residual"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "samples": self.samples,
            "buckets": [list(b) for b in self.buckets],
            "counts": list(self.counts),
            "error": {q: [list(r) for r in rows] for q, rows in self.error.items()},
            "keys": self.keys,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Anatomy:
        return cls(
            length=int(d["length"]),
            samples=int(d["samples"]),
            buckets=[(int(a), int(b)) for a, b in d["buckets"]],
            counts=[int(c) for c in d["counts"]],
            error={q: [[float(v) for v in r] for r in rows] for q, rows in d["error"].items()},
            keys=str(d.get("keys", KEYS_NOTE)),
        )


class ErrorTally:
    """Bucket sums of the compressed model's relative errors against captured references, per sample.

    `compare_to(model, i)` wraps one forward of sample i; its sums count only when that forward finished
    (`done(i)`), so a pass that ran out of memory leaves nothing behind."""

    def __init__(self, refs: Sequence[Captured]) -> None:
        self.refs = list(refs)
        self.length = self.refs[0]["residual"][0].shape[0]
        self.buckets = bucket_edges(self.length)
        self.index = bucket_index(self.length)
        self.quantities = [q for q in QUANTITIES if q in self.refs[0]]
        self.sums: dict[int, dict[str, torch.Tensor]] = {}  # sample → quantity → (layers, buckets) float64

    def done(self, i: int) -> bool:
        return i in self.sums

    @contextlib.contextmanager
    def compare_to(self, model: nn.Module, i: int) -> Iterator[None]:
        """While active, a forward of `model` on sample i's tokens adds its bucket sums for sample i."""
        ref = self.refs[i]
        n_layers, nb = len(ref["residual"]), len(self.buckets)
        acc = {q: torch.zeros(n_layers, nb, dtype=torch.float64) for q in self.quantities}

        def add(q: str, k: int, y: torch.Tensor) -> None:
            if q in acc:  # both sides rounded alike (Stored): identical rows give exactly 0
                r = ref[q][k].unpack(y.device)
                acc[q][k] += bucket_sums(relative_error(Stored.pack(y).unpack(), r), self.index, nb)

        with _hooks(model, add):
            yield
        self.sums[i] = acc

    def result(self) -> Anatomy | None:
        """Bucket means over the samples compared so far (None when none was)."""
        if not self.sums:
            return None
        n = len(self.sums)
        counts = [(hi - lo) * n for lo, hi in self.buckets]
        error = {}
        for q in self.quantities:
            total = sum(s[q] for s in self.sums.values())  # (layers, buckets)
            error[q] = (total / torch.tensor(counts, dtype=torch.float64)).tolist()
        return Anatomy(self.length, n, self.buckets, counts, error)


def bucket_label(lo: int, hi: int) -> str:
    return str(lo) if hi - lo == 1 else f"{lo}–{hi - 1}"


def format_tables(d: dict[str, Any], fmt: str = "github") -> str:
    """An anatomy (Anatomy.to_dict) as text: the residual stream layers × buckets, then K and V per bucket as the
    mean over layers and at the first and last layer. Relative errors in %."""
    from tabulate import tabulate

    a = Anatomy.from_dict(d)
    heads = [bucket_label(lo, hi) for lo, hi in a.buckets]

    def pct(v: float) -> str:
        return f"{100 * v:.3g}" if math.isfinite(v) else "—"

    res = tabulate(
        [[f"layer {l}"] + [pct(v) for v in row] for l, row in enumerate(a.error["residual"])],  # noqa: E741
        headers=["residual %", *heads],
        tablefmt=fmt,
        disable_numparse=True,
        colalign=("left",) + ("right",) * len(heads),
    )
    rows = []
    for q in ("k", "v"):
        m = a.error.get(q)
        if not m:
            continue
        mean = [sum(col) / len(col) for col in zip(*m, strict=True)]
        rows += [
            [f"{q.upper()} mean over layers"] + [pct(v) for v in mean],
            [f"{q.upper()} layer 0"] + [pct(v) for v in m[0]],
            [f"{q.upper()} layer {len(m) - 1}"] + [pct(v) for v in m[-1]],
        ]
    kv = (
        tabulate(
            rows,
            headers=["K / V %", *heads],
            tablefmt=fmt,
            disable_numparse=True,
            colalign=("left",) + ("right",) * len(heads),
        )
        if rows
        else "K / V: not captured (no k_proj / v_proj in every layer)"
    )
    head = (
        f"relative error ‖x_cmp − x_ref‖ / ‖x_ref‖ in %, mean per log2 position bucket, length {a.length}, "
        f"{a.samples} sample(s); keys and values: {a.keys}"
    )
    return f"{head}\n\n{res}\n\n{kv}"
