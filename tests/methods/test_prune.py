"""Pruning families (magnitude, wanda, random): exact per-row counts, N:M patterns, criteria, validation."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from torch import nn

from lcc_harness.errors import MethodError
from lcc_harness.methods import CompressContext, parse_method
from lcc_harness.methods.prune import RandomPrune

FAMILIES = ("magnitude", "wanda", "random")


def calib(n: int = 2, length: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, 256, (length,), generator=g) for _ in range(n))


def prune(model: nn.Module, method_id: str, **ctx_kw) -> tuple[nn.Module, CompressContext]:
    m = parse_method(method_id)
    ctx = CompressContext(calibration=calib() if m.needs_calibration else (), **ctx_kw)
    return m.apply(model, ctx), ctx


def target_weights(model: nn.Module, ctx: CompressContext | None = None) -> dict[str, torch.Tensor]:
    ctx = ctx or CompressContext()
    return {name: lin.weight.detach().clone() for name, lin in ctx.linears(model)}


# ---------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("magnitude-s50", "magnitude-s50"),
        ("magnitude-s50.0", "magnitude-s50"),
        ("wanda-s12.5", "wanda-s12.5"),
        ("wanda-s12.50", "wanda-s12.5"),
        ("random-s10", "random-s10"),
        ("random-s0.5", "random-s0.5"),
        ("magnitude-2:4", "magnitude-2:4"),
        ("wanda-2:4", "wanda-2:4"),
        ("random-1:8", "random-1:8"),
        ("random-s10-seed3", "random-s10-seed3"),
        ("random-s10-seed03", "random-s10-seed3"),
        ("random-s10-seed0", "random-s10-seed0"),
        ("random-2:4-seed7", "random-2:4-seed7"),
    ],
)
def test_id_round_trip(text: str, canonical: str) -> None:
    m = parse_method(text)
    assert m.id == canonical
    assert parse_method(m.id) == m
    assert parse_method(m.id).id == canonical


def test_needs_calibration_only_for_wanda() -> None:
    assert parse_method("wanda-s50").needs_calibration
    assert not parse_method("magnitude-s50").needs_calibration
    assert not parse_method("random-2:4").needs_calibration


@pytest.mark.parametrize(
    "bad, hint",
    [
        ("magnitude-s0", "0 < P < 100"),
        ("magnitude-s100", "0 < P < 100"),
        ("wanda-s150", "0 < P < 100"),
        ("random-s-5", "0 < P < 100"),
        ("magnitude-1.5:4", "whole numbers"),
        ("wanda-2:4.0", "whole numbers"),
        ("magnitude-4:4", "0 < N < M"),
        ("random-5:4", "0 < N < M"),
        ("wanda-0:4", "0 < N < M"),
        ("random-s10-seed1.5", "whole number"),
        ("random-s10-seed4611686018427387905", r"\[0, 2\*\*62\]"),  # beyond: two seeds would share a mask
    ],
)
def test_bad_ids_raise_helpful_error(bad: str, hint: str) -> None:
    with pytest.raises(MethodError, match=hint) as info:
        parse_method(bad)
    assert bad.split("-")[0] in str(info.value)  # names the family form to write instead


def test_nm_width_not_divisible_names_the_layer(model: nn.Module) -> None:
    before = target_weights(model)
    with pytest.raises(MethodError, match=r"input width 64 of model\.layers\.0\.self_attn\.q_proj"):
        prune(model, "magnitude-2:3")
    after = target_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # checked before touching anything


def test_wanda_without_calibration_is_a_method_error(model: nn.Module) -> None:
    with pytest.raises(MethodError, match="calibration"):
        parse_method("wanda-s50").apply(model, CompressContext())


# ---------------------------------------------------------------- exact counts and patterns


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pct", ["50", "10", "12.5", "33", "3.90625"])
def test_exact_zeros_per_row(model: nn.Module, family: str, pct: str) -> None:
    # round() is half-to-even: 3.90625 % of 64 = 2.5 → 2, of 128 = 5.0 → 5; 33 % of 64 = 21.12 → 21
    before = target_weights(model)
    assert all(bool((w != 0).all()) for w in before.values())  # dense to start with
    _, ctx = prune(model, f"{family}-s{pct}")
    zeros = 0
    total = 0
    for name, w in target_weights(model).items():
        k = round(float(pct) * w.shape[1] / 100)
        per_row = (w == 0).sum(dim=1)
        assert per_row.eq(k).all(), f"{name}: zeros per row {per_row.unique().tolist()} != {k}"
        # kept weights are untouched
        assert torch.equal(w[w != 0], before[name][w != 0])
        zeros += k * w.shape[0]
        total += w.numel()
    assert ctx.info["sparsity"] == pytest.approx(zeros / total, abs=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8), (1, 2)])
def test_nm_pattern_exact(model: nn.Module, family: str, n: int, m: int) -> None:
    before = target_weights(model)
    _, ctx = prune(model, f"{family}-{n}:{m}")
    for name, w in target_weights(model).items():
        groups = w.reshape(w.shape[0], -1, m)  # (O, I/M, M)
        nonzero = (groups != 0).sum(dim=2)
        assert nonzero.eq(n).all(), f"{name}: nonzeros per group {nonzero.unique().tolist()} != {n}"
        assert torch.equal(w[w != 0], before[name][w != 0])
    assert ctx.info["sparsity"] == pytest.approx((m - n) / m, abs=1e-12)


@pytest.mark.parametrize("family", ["magnitude", "random"])
def test_nm_with_existing_zeros_keeps_at_most_n(model: nn.Module, family: str) -> None:
    lin = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        lin.weight[:, 0:4] = 0  # a whole group already empty
        lin.weight[:, 5] = 0  # one zero already in the second group
    prune(model, f"{family}-2:4")
    groups = lin.weight.reshape(lin.out_features, -1, 4)
    nonzero = (groups != 0).sum(dim=2)
    assert nonzero.le(2).all()
    assert nonzero[:, 0].eq(0).all()
    assert nonzero[:, 2:].eq(2).all()


# ---------------------------------------------------------------- criteria


@pytest.mark.parametrize("method_id", ["magnitude-s50", "magnitude-s12.5"])
def test_magnitude_removes_smallest(model: nn.Module, method_id: str) -> None:
    before = target_weights(model)
    prune(model, method_id)
    for name, w in target_weights(model).items():
        a = before[name].abs()
        pruned = w == 0
        min_kept = torch.where(pruned, torch.inf, a).amin(dim=1)
        max_pruned = torch.where(pruned, a, -torch.inf).amax(dim=1)
        assert bool((min_kept >= max_pruned).all()), name
        assert bool(torch.isfinite(min_kept).all()) and bool(torch.isfinite(max_pruned).all())


def test_magnitude_nm_removes_smallest_in_each_group(model: nn.Module) -> None:
    before = target_weights(model)
    prune(model, "magnitude-2:4")
    for name, w in target_weights(model).items():
        a = before[name].abs().reshape(w.shape[0], -1, 4)
        pruned = (w == 0).reshape(a.shape)
        min_kept = torch.where(pruned, torch.inf, a).amin(dim=2)
        max_pruned = torch.where(pruned, a, -torch.inf).amax(dim=2)
        assert bool((min_kept >= max_pruned).all()), name


def test_magnitude_ties_break_to_lower_index() -> None:
    toy = _Toy(torch.ones(4), torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, -1.0, 1.0, -2.0]]))
    parse_method("magnitude-s50").apply(toy, CompressContext())
    w = toy.body.layers[0].weight
    assert w[0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert w[1].tolist() == [2.0, 0.0, 0.0, -2.0]


class _Body(nn.Module):
    """A decoder body: embedding → one Linear, returning last_hidden_state like an HF model."""

    def __init__(self, emb: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__()
        self.embed = nn.Embedding(emb.shape[0], emb.shape[1])
        self.layers = nn.ModuleList([nn.Linear(weight.shape[1], weight.shape[0], bias=False)])
        with torch.no_grad():
            self.embed.weight.copy_(emb)
            self.layers[0].weight.copy_(weight)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False):
        from types import SimpleNamespace

        return SimpleNamespace(last_hidden_state=self.layers[0](self.embed(input_ids)))


class _Toy(nn.Module):
    """Minimal model the calibration pass accepts: get_decoder + get_input_embeddings."""

    def __init__(self, emb_row: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__()
        self.body = _Body(emb_row.view(1, -1), weight)

    def get_decoder(self) -> nn.Module:
        return self.body

    def get_input_embeddings(self) -> nn.Module:
        return self.body.embed


def test_wanda_matches_hand_computed_score() -> None:
    # X: 4 tokens all equal to e = [2, .5, .5, .125] → ||X_j||_2 = 2e = [4, 1, 1, .25]
    w = torch.tensor([[0.5, 3.0, 4.0, 40.0], [1.0, 2.0, 3.0, 4.0]])
    emb = torch.tensor([2.0, 0.5, 0.5, 0.125])
    # scores |W|·||X||: row0 [2, 3, 4, 10] → prune cols 0, 1; row1 [4, 2, 3, 1] → prune cols 3, 1
    # (magnitude prunes 0, 1 in row1; squared norms ||X||² would prune 3, 1 in row0)
    expected = torch.tensor([[0.0, 0.0, 4.0, 40.0], [1.0, 0.0, 3.0, 0.0]])
    mag = _Toy(emb, w)
    parse_method("magnitude-s50").apply(mag, CompressContext())
    assert not torch.equal(mag.body.layers[0].weight, expected)

    toy = _Toy(emb, w)
    ctx = CompressContext(calibration=(torch.zeros(4, dtype=torch.long),))
    parse_method("wanda-s50").apply(toy, ctx)
    assert torch.equal(toy.body.layers[0].weight, expected)
    assert ctx.info["sparsity"] == 0.5

    toy = _Toy(emb, w)
    parse_method("wanda-1:2").apply(toy, ctx)  # pairs: row0 [2, 3 | 4, 10], row1 [4, 2 | 3, 1]
    assert torch.equal(toy.body.layers[0].weight, torch.tensor([[0.0, 3.0, 0.0, 40.0], [1.0, 0.0, 3.0, 0.0]]))


def test_wanda_uses_dense_input_norms(model: nn.Module) -> None:
    """Wanda's mask on tiny-llama equals |W|·||X|| with X captured by hand from the dense model."""
    cal = calib()
    captured: dict[str, list[torch.Tensor]] = {}
    lins = dict(CompressContext().linears(model))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    hooks = [
        lins[n].register_forward_pre_hook(lambda mod, args, n=n: captured.setdefault(n, []).append(args[0]))
        for n in names
    ]
    with torch.no_grad():
        for ids in cal:
            model(input_ids=ids.view(1, -1))
    for h in hooks:
        h.remove()
    before = target_weights(model)
    ctx = CompressContext(calibration=cal)
    parse_method("wanda-s50").apply(model, ctx)
    after = target_weights(model)
    for n in names:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured[n]]).double()  # (tokens, in)
        score = before[n].double().abs() * x.pow(2).sum(0).sqrt()[None, :]  # (out, in)
        k = before[n].shape[1] // 2
        thresh = score.sort(dim=1).values[:, k - 1 : k + 1]  # k-th and (k+1)-th smallest
        expected = score <= thresh[:, :1]
        assert bool((thresh[:, 1] > thresh[:, 0]).all())  # no ties at the cut, so the mask is unique
        assert torch.equal(after[n] == 0, expected), n


def test_wanda_differs_from_magnitude(tiny: nn.Module) -> None:
    wanda, _ = prune(copy.deepcopy(tiny), "wanda-s50")
    mag, _ = prune(copy.deepcopy(tiny), "magnitude-s50")
    w_masks = {k: v == 0 for k, v in target_weights(wanda).items()}
    m_masks = {k: v == 0 for k, v in target_weights(mag).items()}
    differ = [k for k in w_masks if not torch.equal(w_masks[k], m_masks[k])]
    assert len(differ) == len(w_masks)  # non-uniform input norms change the choice in every layer


def test_random_reproducible_and_seeded(tiny: nn.Module) -> None:
    a, _ = prune(copy.deepcopy(tiny), "random-s50", seed=0)
    b, _ = prune(copy.deepcopy(tiny), "random-s50", seed=0)
    c, _ = prune(copy.deepcopy(tiny), "random-s50", seed=1)
    wa, wb, wc = target_weights(a), target_weights(b), target_weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(not torch.equal(wa[k] == 0, wc[k] == 0) for k in wa)


def test_mask_seed_only_for_random() -> None:
    assert parse_method("random-s10-seed3").mask_seed == 3
    assert parse_method("random-s10").mask_seed is None
    for bad in ("magnitude-s50-seed3", "wanda-2:4-seed1"):
        with pytest.raises(MethodError, match="unknown method id"):
            parse_method(bad)
    with pytest.raises(MethodError, match="whole number >= 0"):
        parse_method("random-s10-seed-1")
    with pytest.raises(MethodError, match="mask seed"):
        RandomPrune(percent=10, mask_seed=-1)


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: w == 0 for name, w in target_weights(model).items()}


def test_mask_seed_fixes_the_mask_whatever_the_sample_seed(tiny: nn.Module) -> None:
    a, ctx_a = prune(copy.deepcopy(tiny), "random-s10-seed3", seed=0)
    b, ctx_b = prune(copy.deepcopy(tiny), "random-s10-seed3", seed=5)
    ma, mb = masks(a), masks(b)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert ctx_a.info["mask_seed"] == ctx_b.info["mask_seed"] == 3
    assert ctx_a.info["mask_seed_from"] == "method id"


def test_mask_seeds_give_different_masks(tiny: nn.Module) -> None:
    ma = masks(prune(copy.deepcopy(tiny), "random-s10-seed3")[0])
    mb = masks(prune(copy.deepcopy(tiny), "random-s10-seed4")[0])
    assert all(not torch.equal(ma[k], mb[k]) for k in ma)
    assert all((ma[k].sum(1) == mb[k].sum(1)).all() for k in ma)  # same k per row, other positions


def test_seed_suffix_s_equals_run_seed_s(tiny: nn.Module) -> None:
    """-seed{S} draws the mask the run seed S draws without the suffix: one seeding rule for both."""
    ma = masks(prune(copy.deepcopy(tiny), "random-s10-seed2", seed=0)[0])
    mb = masks(prune(copy.deepcopy(tiny), "random-s10", seed=2)[0])
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


# sha256 (first 16 hex) of the tiny model's target weights after each method, per run seed, computed with the code
# before the mask seed existed (commit 015d14c): the committed baselines' random-s10 must not move.
GOLDEN = {
    ("random-s10", 0): "def355f8bd1c1b20",
    ("random-s10", 1): "bfbf140106d7ac37",
    ("random-2:4", 0): "a0b1562f57d78c78",
}


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, lin in CompressContext().linears(model):
        h.update(name.encode())
        h.update(lin.weight.detach().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("method_id, seed", sorted(GOLDEN))
def test_without_suffix_masks_unchanged(tiny: nn.Module, method_id: str, seed: int) -> None:
    out, ctx = prune(copy.deepcopy(tiny), method_id, seed=seed)
    assert weights_digest(out) == GOLDEN[(method_id, seed)]
    assert ctx.info["mask_seed"] == seed and ctx.info["mask_seed_from"] == "run seed"


def test_without_suffix_mask_is_the_documented_rule(tiny: nn.Module) -> None:
    """random-s10 at run seed s: per layer, torch.rand from a generator seeded (s·1000003 + hash(name)) mod 2⁶³−1,
    the round(10 % · I) lowest per row (spelled out here, independent of the code under test)."""

    def name_hash(text: str) -> int:
        h = 0
        for ch in text.encode():
            h = (h * 131 + ch) % (2**61 - 1)
        return h

    seed = 1
    got = masks(prune(copy.deepcopy(tiny), "random-s10", seed=seed)[0])
    for name, lin in CompressContext().linears(tiny):
        g = torch.Generator().manual_seed((seed * 1_000_003 + name_hash(name)) % (2**63 - 1))
        noise = torch.rand(lin.weight.shape, generator=g)
        k = round(10 * lin.in_features / 100)
        want = torch.zeros_like(noise, dtype=torch.bool).scatter_(
            1, noise.argsort(dim=1, stable=True)[:, :k], True
        )
        assert torch.equal(got[name], want | (lin.weight == 0)), name


def test_random_is_not_magnitude(tiny: nn.Module) -> None:
    before = target_weights(tiny)
    r, _ = prune(copy.deepcopy(tiny), "random-s50")
    for name, w in target_weights(r).items():
        a = before[name].abs()
        pruned = w == 0
        # a random choice prunes some weights larger than some kept ones in most rows
        bad_rows = torch.where(pruned, a, -torch.inf).amax(1) > torch.where(pruned, torch.inf, a).amin(1)
        assert bad_rows.float().mean() > 0.9, name


# ---------------------------------------------------------------- scope, dtype


@pytest.mark.parametrize("method_id", ["magnitude-s50", "wanda-2:4", "random-s10"])
def test_only_targets_touched(model: nn.Module, method_id: str) -> None:
    targets = {n for n, _ in CompressContext().linears(model)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, method_id)
    for k, v in model.state_dict().items():
        owner = k.rsplit(".", 1)[0]
        if owner in targets and k.endswith("weight"):
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k  # lm_head, embeddings, norms untouched
    assert "lm_head.weight" in before and "model.embed_tokens.weight" in before


def test_exclude_is_respected(model: nn.Module) -> None:
    before = target_weights(model)
    _, ctx = prune(model, "magnitude-s50", exclude=("*mlp*",))
    for name, w in target_weights(model).items():
        if ".mlp." in name:
            assert torch.equal(w, before[name]), name
        else:
            assert (w == 0).sum(dim=1).eq(w.shape[1] // 2).all(), name
    assert ctx.info["sparsity"] == pytest.approx(0.5, abs=0)  # over the targets only


def test_keeps_dtype(model: nn.Module) -> None:
    model = model.to(torch.bfloat16)
    prune(model, "wanda-s50")
    for name, w in target_weights(model).items():
        assert w.dtype == torch.bfloat16
        assert (w == 0).sum(dim=1).eq(w.shape[1] // 2).all(), name
