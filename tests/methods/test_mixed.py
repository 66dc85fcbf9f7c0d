"""mixed / mixed-random / mixed-saliency: which groups stay at 8 bits, the budget k, ids, effective bits."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from torch import nn

from lcc_harness.errors import MethodError
from lcc_harness.methods._quant import fake_quant_groups
from lcc_harness.methods.basic import RTN
from lcc_harness.methods.mixed import (
    MixedMaxAbs,
    MixedRandom,
    MixedSaliency,
    high_precision_count,
    top_k_mask,
)
from lcc_harness.methods.registry import CompressContext, parse_method


def calib_spans(n: int = 2, length: int = 64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    return tuple(torch.randint(0, 256, (length,), generator=g) for _ in range(n))


def kept_at_8(w0: torch.Tensor, w1: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """(O, I/G) bool: which groups of the new weight w1 are the 8-bit RTN of w0 (others must be b-bit RTN)."""
    out_f, in_f = w0.shape
    q8 = fake_quant_groups(w0, 8, group).view(out_f, in_f // group, group)
    qb = fake_quant_groups(w0, bits, group).view(out_f, in_f // group, group)
    new = w1.view(out_f, in_f // group, group)
    is8 = (new == q8).all(-1)
    isb = (new == qb).all(-1)
    assert not (q8 == qb).all(-1).any(), "test weights must make 8-bit and b-bit groups differ"
    assert (is8 ^ isb).all(), "every group must be exactly the 8-bit or the b-bit RTN of the original"
    return is8


def apply_and_masks(method, model: nn.Module, ctx: CompressContext) -> dict[str, torch.Tensor]:
    """Apply `method` to a copy of `model`; name → (O, I/G) mask of groups kept at 8 bits."""
    before = {n: lin.weight.detach().clone() for n, lin in ctx.linears(model)}
    out = method.apply(copy.deepcopy(model), ctx)
    return {
        n: kept_at_8(before[n], lin.weight.detach(), method.bits, method.group) for n, lin in ctx.linears(out)
    }


class OneLinear(nn.Module):
    """Embedding → one Linear named `layers.0`; calibration runs through it like through a decoder body."""

    def __init__(self, weight: torch.Tensor, emb: torch.Tensor) -> None:
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(emb.clone(), freeze=True)  # (V, I)
        self.layers = nn.ModuleList([nn.Linear(weight.shape[1], weight.shape[0], bias=False)])
        self.layers[0].weight.data.copy_(weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def get_decoder(self) -> nn.Module:
        return self

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        return self.layers[0](self.embed(input_ids))


# ---------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "text, cls, canonical",
    [
        ("mixed-w3-g128-p2", MixedMaxAbs, "mixed-w3-g128-p2"),
        ("mixed-w3-g128", MixedMaxAbs, "mixed-w3-g128-p2"),  # pct defaults to 2
        ("mixed-w2-g64-p0.5", MixedMaxAbs, "mixed-w2-g64-p0.5"),
        ("mixed-w4-g0-p2.50", MixedMaxAbs, "mixed-w4-g0-p2.5"),
        ("mixed-w8-g32-p0", MixedMaxAbs, "mixed-w8-g32-p0"),
        ("mixed-random-w3-g128-p2", MixedRandom, "mixed-random-w3-g128-p2"),
        ("mixed-random-w3-g128-p0.00001", MixedRandom, "mixed-random-w3-g128-p0.00001"),
        ("mixed-saliency-w3-g128-p99.9", MixedSaliency, "mixed-saliency-w3-g128-p99.9"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_ids_parse_to_their_family_and_round_trip(text: str, cls: type, canonical: str) -> None:
    m = parse_method(text)
    assert type(m) is cls
    assert m.id == canonical
    assert parse_method(m.id) == m
    assert type(parse_method(m.id)) is cls


def test_controls_are_distinct_methods_with_the_same_parameters() -> None:
    a, r, s = (parse_method(f"{f}-w3-g128-p2") for f in ("mixed", "mixed-random", "mixed-saliency"))
    assert (a.bits, a.group, a.pct) == (r.bits, r.group, r.pct) == (s.bits, s.group, s.pct) == (3, 128, 2.0)
    assert a != r and a != s and r != s
    assert s.needs_calibration and not a.needs_calibration and not r.needs_calibration


@pytest.mark.parametrize(
    "bad",
    [
        "mixed-w1-g128-p2",
        "mixed-w9-g128-p2",
        "mixed-w3-g128-p100",
        "mixed-w3-g128-p150",
        "mixed-random-w1-g128-p2",
        "mixed-saliency-w3-g128-p100.0",
        "mixed-w3-g128-p",
        "mixed-w3-g128-p-1",
        "mixed-w3-p2",
    ],
)
def test_bad_ids_raise_method_error(bad: str) -> None:
    with pytest.raises(MethodError):
        parse_method(bad)


def test_bad_parameters_raise_when_constructed_directly() -> None:
    for kwargs in ({"pct": float("nan")}, {"pct": -1.0}, {"bits": 0}, {"group": -1}):
        with pytest.raises(MethodError):
            MixedMaxAbs(**kwargs)


@pytest.mark.parametrize("family", ["mixed", "mixed-random", "mixed-saliency"])
def test_group_not_dividing_the_width_raises_and_leaves_the_model_alone(tiny: nn.Module, family: str) -> None:
    model = copy.deepcopy(tiny)
    before = [p.detach().clone() for p in model.parameters()]
    ctx = CompressContext(calibration=calib_spans())
    with pytest.raises(MethodError, match="does not divide"):
        parse_method(f"{family}-w3-g48-p2").apply(model, ctx)  # hidden 64 is not a multiple of 48
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ---------------------------------------------------------------- budget and ranking helpers


@pytest.mark.parametrize(
    "n, pct, k",
    [
        (100, 2.0, 2),
        (64, 0.78125, 1),  # 0.5 → 1: half rounds up
        (10, 25.0, 3),  # 2.5 → 3 (Python's round would give 2)
        (20, 2.5, 1),  # 0.5 exactly in decimal, though 2.5/100*20 is not exact in binary floats
        (200, 0.25, 1),
        (10, 14.0, 1),  # 1.4 → 1
        (7, 99.9, 7),
        (128, 0.0, 0),
        (0, 2.0, 0),
    ],
)
def test_k_is_round_half_up_of_pct_of_groups(n: int, pct: float, k: int) -> None:
    assert high_precision_count(n, pct) == k


def test_top_k_ties_go_to_the_lower_flat_index() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0], [2.0, 3.0, 0.0]])
    assert top_k_mask(scores, 2).tolist() == [[False, True, True], [False, False, False]]
    assert top_k_mask(scores, 3).tolist() == [[False, True, True], [False, True, False]]
    assert top_k_mask(scores, 0).sum() == 0


# ---------------------------------------------------------------- mixed (max|w|)


def test_mixed_keeps_exactly_the_top_pct_groups_by_max_abs(tiny: nn.Module) -> None:
    m = parse_method("mixed-w3-g16-p3")
    ctx = CompressContext()
    masks = apply_and_masks(m, tiny, ctx)
    total_k = 0
    for name, lin in ctx.linears(tiny):
        w = lin.weight.detach()
        out_f, in_f = w.shape
        score = w.view(out_f, in_f // 16, 16).abs().amax(-1).flatten()  # (O·n,)
        assert score.unique().numel() == score.numel()  # no ties: the top set is well defined
        k = high_precision_count(score.numel(), 3.0)
        expected = torch.zeros_like(score, dtype=torch.bool)
        expected[score.argsort(descending=True)[:k]] = True
        assert k > 0
        assert int(masks[name].sum()) == k, name
        assert torch.equal(masks[name].flatten(), expected), name
        total_k += k
    assert ctx.info["high_precision_groups"] == total_k


def test_mixed_keeps_planted_outlier_groups() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=g) * 0.01  # (O, I), 8 groups of 4 per row, 64 groups
    planted = [(0, 3), (2, 0), (5, 7), (7, 4)]  # (row, group)
    for r, c in planted:
        w[r, 4 * c + 1] = 1.0
    model = OneLinear(w, torch.zeros(1, 32))
    m = MixedMaxAbs(bits=2, group=4, pct=6.25)  # k = 6.25% of 64 = 4
    masks = apply_and_masks(m, model, CompressContext())
    got = {tuple(ix) for ix in masks["layers.0"].nonzero().tolist()}
    assert got == set(planted)


@pytest.mark.parametrize("family", ["mixed", "mixed-random", "mixed-saliency"])
def test_p0_equals_plain_rtn(tiny: nn.Module, family: str) -> None:
    ctx_m, ctx_r = CompressContext(calibration=calib_spans()), CompressContext()
    got = parse_method(f"{family}-w3-g32-p0").apply(copy.deepcopy(tiny), ctx_m)
    ref = RTN(bits=3, group=32).apply(copy.deepcopy(tiny), ctx_r)
    for (n, a), (_, b) in zip(ctx_m.linears(got), ctx_r.linears(ref), strict=True):
        assert torch.equal(a.weight, b.weight), n
    assert ctx_m.info["effective_bits"] == pytest.approx(ctx_r.info["effective_bits"], rel=1e-12)
    assert ctx_m.info["high_precision_groups"] == 0


def test_model_dtype_is_kept(tiny: nn.Module) -> None:
    model = copy.deepcopy(tiny).to(torch.bfloat16)
    parse_method("mixed-w3-g32-p5").apply(model, CompressContext())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- effective bits


def test_effective_bits_by_hand() -> None:
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))  # 4 rows × 2 groups of 32 = 8
    ctx = CompressContext()
    MixedMaxAbs(bits=3, group=32, pct=25).apply(OneLinear(w, torch.zeros(1, 64)), ctx)  # k = 2
    # 8-bit groups: 8 + (16+8)/32 = 8.75; 3-bit groups: 3 + (16+3)/32 = 3.59375
    assert ctx.info["effective_bits"] == pytest.approx((2 * 8.75 + 6 * 3.59375) / 8, rel=1e-12)
    assert ctx.info["effective_bits"] == pytest.approx(4.8828125, rel=1e-12)
    assert ctx.info["high_precision_groups"] == 2
    assert ctx.info["high_precision_fraction"] == pytest.approx(0.25)


def test_effective_bits_over_the_tiny_model(tiny: nn.Module) -> None:
    ctx = CompressContext()
    MixedRandom(bits=2, group=16, pct=10).apply(copy.deepcopy(tiny), ctx)
    bits = weights = 0.0
    k_all = n_all = 0
    for _, lin in ctx.linears(tiny):
        n = lin.weight.numel() // 16
        k = high_precision_count(n, 10)
        bits += 16 * (k * (8 + 24 / 16) + (n - k) * (2 + 18 / 16))
        weights += lin.weight.numel()
        k_all, n_all = k_all + k, n_all + n
    assert ctx.info["effective_bits"] == pytest.approx(bits / weights, rel=1e-12)
    assert ctx.info["high_precision_groups"] == k_all
    assert ctx.info["high_precision_fraction"] == pytest.approx(k_all / n_all)
    assert 2 + 18 / 16 < ctx.info["effective_bits"] < 8 + 24 / 16


# ---------------------------------------------------------------- random control


def test_random_control_same_budget_other_groups_reproducible(tiny: nn.Module) -> None:
    mixed = apply_and_masks(parse_method("mixed-w3-g16-p3"), tiny, CompressContext())
    rand = parse_method("mixed-random-w3-g16-p3")
    r0 = apply_and_masks(rand, tiny, CompressContext(seed=0))
    r0_again = apply_and_masks(rand, tiny, CompressContext(seed=0))
    r1 = apply_and_masks(rand, tiny, CompressContext(seed=1))
    assert mixed.keys() == r0.keys() == r1.keys()
    for name in mixed:
        k = int(mixed[name].sum())
        assert k >= 3
        assert int(r0[name].sum()) == k == int(r1[name].sum()), name
        assert not torch.equal(r0[name], mixed[name]), name
        assert torch.equal(r0[name], r0_again[name]), name
        assert not torch.equal(r0[name], r1[name]), name
    # layers with the same shape draw different sets: the generator is salted by the layer name
    assert not torch.equal(r0["model.layers.0.self_attn.q_proj"], r0["model.layers.1.self_attn.q_proj"])


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("mixed-random-w3-g64-p2-seed3", "mixed-random-w3-g64-p2-seed3"),
        ("mixed-random-w3-g64-seed3", "mixed-random-w3-g64-p2-seed3"),
        ("mixed-random-w3-g64-p2-seed0", "mixed-random-w3-g64-p2-seed0"),
        ("mixed-random-w3-g64-p2", "mixed-random-w3-g64-p2"),
    ],
)
def test_random_control_mask_seed_id_round_trip(text: str, canonical: str) -> None:
    m = parse_method(text)
    assert m.id == canonical and parse_method(m.id) == m


def test_mask_seed_only_for_the_random_control() -> None:
    for bad in ("mixed-w3-g64-p2-seed3", "mixed-saliency-w3-g64-p2-seed3"):
        with pytest.raises(MethodError, match="unknown method id"):
            parse_method(bad)
    with pytest.raises(MethodError, match="whole number"):
        parse_method("mixed-random-w3-g64-p2-seed1.5")


def test_random_control_mask_seed_independent_of_run_seed(tiny: nn.Module) -> None:
    rand3, rand4 = parse_method("mixed-random-w3-g16-p3-seed3"), parse_method("mixed-random-w3-g16-p3-seed4")
    a = apply_and_masks(rand3, tiny, CompressContext(seed=0))
    b = apply_and_masks(rand3, tiny, CompressContext(seed=9))
    c = apply_and_masks(rand4, tiny, CompressContext(seed=0))
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert not torch.equal(a[name], c[name]), name
        assert int(a[name].sum()) == int(c[name].sum()), name


def test_random_control_without_suffix_unchanged(tiny: nn.Module) -> None:
    """Weights digest computed before the mask seed existed (commit 015d14c), run seed 0."""
    ctx = CompressContext(seed=0)
    out = parse_method("mixed-random-w3-g16-p3").apply(copy.deepcopy(tiny), ctx)
    h = hashlib.sha256()
    for name, lin in ctx.linears(out):
        h.update(name.encode())
        h.update(lin.weight.detach().numpy().tobytes())
    assert h.hexdigest()[:16] == "f4f7f364c006a0ca"
    assert ctx.info["mask_seed"] == 0 and ctx.info["mask_seed_from"] == "run seed"


# ---------------------------------------------------------------- saliency control


def test_saliency_ranks_by_activation_weighted_error() -> None:
    n_in, n_out, G, T = 16, 8, 4, 50
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(n_out, n_in, generator=gen)  # (O, I): 4 groups per row, 32 groups
    c = 10 ** torch.linspace(-2, 1, n_in)[torch.randperm(n_in, generator=gen)]  # (I,) per-channel activation
    model = OneLinear(w, c.view(1, n_in))  # token 0 embeds to c, so ‖X_j‖₂ = |c_j|·√T
    ctx = CompressContext(calibration=(torch.zeros(T, dtype=torch.long),))
    m = MixedSaliency(bits=3, group=G, pct=25)  # k = 8
    got = apply_and_masks(m, model, ctx)["layers.0"].flatten()

    err = w - fake_quant_groups(w, 3, G)  # (O, I)
    score = ((err * c * T**0.5) ** 2).view(n_out, n_in // G, G).sum(-1).flatten()
    unweighted = (err**2).view(n_out, n_in // G, G).sum(-1).flatten()
    maxabs = w.abs().view(n_out, n_in // G, G).amax(-1).flatten()

    def top8(s: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(s, dtype=torch.bool)
        mask[s.argsort(descending=True)[:8]] = True
        return mask

    # the weighting must matter here, or the test could not tell the scores apart
    assert not torch.equal(top8(score), top8(unweighted))
    assert not torch.equal(top8(score), top8(maxabs))
    assert int(got.sum()) == 8
    assert torch.equal(got, top8(score))


def test_saliency_ignores_large_errors_on_silent_channels() -> None:
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(5)) * 0.01
    w[0, :4] = torch.tensor([1.0, -0.7, 0.33, 0.05])  # big weights, big 2-bit error, but channels 0-3 silent
    c = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    ctx = CompressContext(calibration=(torch.zeros(16, dtype=torch.long),))
    mask = apply_and_masks(MixedSaliency(bits=2, group=4, pct=12.5), OneLinear(w, c.view(1, 8)), ctx)
    assert int(mask["layers.0"].sum()) == 1
    assert not mask["layers.0"][:, 0].any()  # no group over the silent channels is kept
    mask_abs = apply_and_masks(MixedMaxAbs(bits=2, group=4, pct=12.5), OneLinear(w, c.view(1, 8)), ctx)
    assert mask_abs["layers.0"][0, 0]  # while max|w| keeps exactly that group


def test_saliency_without_calibration_raises(tiny: nn.Module) -> None:
    with pytest.raises(MethodError, match="calibration"):
        parse_method("mixed-saliency-w3-g32-p2").apply(copy.deepcopy(tiny), CompressContext())


def test_saliency_on_tiny_model_keeps_k_groups_per_layer(tiny: nn.Module) -> None:
    ctx = CompressContext(calibration=calib_spans())
    masks = apply_and_masks(parse_method("mixed-saliency-w3-g16-p3"), tiny, ctx)
    for name, lin in ctx.linears(tiny):
        assert int(masks[name].sum()) == high_precision_count(lin.weight.numel() // 16, 3.0), name
