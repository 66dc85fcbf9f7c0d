"""GPTQ: lower layer reconstruction error than RTN on the same grid, sequential blocks, determinism, ids."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lcc_harness.errors import MethodError
from lcc_harness.methods._calib import run_calibration
from lcc_harness.methods._quant import fake_quant_groups
from lcc_harness.methods._targets import decoder_layers
from lcc_harness.methods.gptq import GPTQ, _block_width, gptq_quantize
from lcc_harness.methods.registry import CompressContext, parse_method


def _weighted_err(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W − Q) H (W − Q)ᵀ) = ‖X Wᵀ − X Qᵀ‖² (up to H's normalisation)."""
    D = (W - Q).double()
    return float(torch.einsum("oi,ij,oj->", D, H.double(), D))


def _correlated(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs X (n, d) with strongly correlated channels and H = 2 XᵀX / n."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d // 4, generator=g)
    A = torch.randn(d // 4, d, generator=g)
    X = Z @ A + 0.05 * torch.randn(n, d, generator=g)
    return X, (2.0 / n) * X.T.double() @ X.double()


def _levels_per_group(Q: torch.Tensor, group: int) -> int:
    n_out, n_in = Q.shape
    g = n_in if group == 0 else group
    Qg = Q.reshape(n_out, n_in // g, g)
    return max(int(torch.unique(Qg[o, k]).numel()) for o in range(n_out) for k in range(n_in // g))


@pytest.fixture(scope="module")
def calib() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    return tuple(torch.randint(0, 256, (64,), generator=g) for _ in range(4))


@pytest.fixture(scope="module")
def quantized(tiny: nn.Module, calib):
    """method id → (GPTQ-quantized copy of the tiny model, its context info), computed once per module."""
    cache: dict[str, tuple[nn.Module, dict]] = {}

    def get(mid: str) -> tuple[nn.Module, dict]:
        if mid not in cache:
            ctx = CompressContext(calibration=calib)
            cache[mid] = (parse_method(mid).apply(copy.deepcopy(tiny), ctx), ctx.info)
        return cache[mid]

    return get


# --- the core function ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,group,sym",
    [(3, 16, False), (4, 32, False), (2, 0, False), (4, 16, True)],
    ids=["w3-g16", "w4-g32", "w2-g0", "w4-g16-sym"],
)
def test_gptq_quantize_beats_rtn_on_correlated_inputs(bits: int, group: int, sym: bool) -> None:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 64, generator=g)
    _, H = _correlated(512, 64, seed=2)
    Q = gptq_quantize(W, H, bits, group, sym, block_size=32)
    R = fake_quant_groups(W, bits, group, sym)
    e_gptq, e_rtn = _weighted_err(W, Q, H), _weighted_err(W, R, H)
    assert torch.isfinite(Q).all()
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)
    assert _levels_per_group(Q, group) <= 2**bits


def test_gptq_with_identity_hessian_is_rtn() -> None:
    """With uncorrelated unit inputs there is nothing to feed back: GPTQ must reproduce RTN's grid exactly."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 96, generator=g)
    for group in (32, 96, 0):
        Q = gptq_quantize(W, torch.eye(96, dtype=torch.float64), 3, group, block_size=64)
        assert torch.equal(Q, fake_quant_groups(W, 3, group)), group


def test_gptq_dead_columns_are_zeroed() -> None:
    g = torch.Generator().manual_seed(4)
    W = torch.randn(8, 32, generator=g)
    X, _ = _correlated(128, 32, seed=5)
    X[:, [3, 17]] = 0.0
    H = 2.0 * X.T.double() @ X.double() / 128
    Q = gptq_quantize(W, H, 4, 16)
    assert torch.isfinite(Q).all()
    assert torch.all(Q[:, [3, 17]] == 0)
    assert _weighted_err(W, Q, H) < _weighted_err(W, fake_quant_groups(W, 4, 16), H)


def test_gptq_quantize_rejects_wrong_hessian_and_group() -> None:
    W = torch.randn(4, 32)
    with pytest.raises(ValueError):
        gptq_quantize(W, torch.eye(16), 4, 16)
    with pytest.raises(MethodError):
        gptq_quantize(W, torch.eye(32), 4, 12)


@pytest.mark.parametrize(
    "group,block,expected",
    [(128, 128, 128), (32, 128, 128), (96, 128, 96), (576, 128, 96), (1536, 128, 128), (48, 100, 96)],
)
def test_block_width_is_aligned_with_groups(group: int, block: int, expected: int) -> None:
    bw = _block_width(group, block)
    assert bw == expected
    assert bw % group == 0 or group % bw == 0


# --- the method on the tiny model ---------------------------------------------------------------------------


def _block_inputs(model: nn.Module, block: nn.Module, calib) -> dict[int, torch.Tensor]:
    """id(Linear) → X (tokens, in) of every Linear inside `block` over the calibration spans."""
    xs: dict[int, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, a: xs.setdefault(id(mod), []).append(a[0].reshape(-1, mod.in_features).double())
        )
        for m in block.modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        run_calibration(model, calib)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in xs.items()}


@pytest.mark.parametrize("mid", ["gptq-w3-g32", "gptq-w4-g0", "gptq-w2-g16-sym"])
def test_gptq_layer_error_below_rtn(tiny: nn.Module, calib, quantized, mid: str) -> None:
    """Each Linear's ‖XWᵀ − XŴᵀ‖² on the inputs GPTQ optimised for (earlier blocks quantized) beats RTN's."""
    m = parse_method(mid)
    q, _ = quantized(mid)
    orig_layers, q_layers = decoder_layers(tiny), decoder_layers(q)
    total, e_g_sum, e_r_sum = 0, 0.0, 0.0
    for i in range(len(orig_layers)):
        mixed = copy.deepcopy(tiny)  # blocks < i quantized by GPTQ, block i original
        for j in range(i):
            decoder_layers(mixed)[j].load_state_dict(q_layers[j].state_dict())
        X = _block_inputs(mixed, decoder_layers(mixed)[i], calib)
        pairs = zip(decoder_layers(mixed)[i].named_modules(), q_layers[i].named_modules(), strict=True)
        for (name, lin), (_, qlin) in pairs:
            if not isinstance(lin, nn.Linear):
                continue
            W = lin.weight.detach().double()
            Xl = X[id(lin)]
            e_g = float(((Xl @ (W - qlin.weight.detach().double()).T) ** 2).sum())
            R = fake_quant_groups(lin.weight.detach(), m.bits, m.group, m.sym).double()
            e_r = float(((Xl @ (W - R).T) ** 2).sum())
            assert e_g == e_g and e_r == e_r, f"NaN error in block {i} {name}"
            assert e_g < 0.95 * e_r, f"block {i} {name}: gptq {e_g:.4g} vs rtn {e_r:.4g}"
            total += 1
            e_g_sum += e_g
            e_r_sum += e_r
            assert _levels_per_group(qlin.weight.detach(), m.group) <= 2**m.bits
    assert total == 14
    assert e_g_sum < 0.8 * e_r_sum, (e_g_sum, e_r_sum)


def test_gptq_matches_slow_sequential_reference(tiny: nn.Module, calib, quantized) -> None:
    """Block replay on recorded inputs equals the textbook loop: full-model calibration pass per block with
    the earlier blocks already quantized, then gptq_quantize of each Linear on its H = 2XᵀX/n."""
    fast, _ = quantized("gptq-w3-g32")
    slow = copy.deepcopy(tiny)
    for block in decoder_layers(slow):
        X = _block_inputs(slow, block, calib)
        with torch.no_grad():
            for lin in [mod for mod in block.modules() if isinstance(mod, nn.Linear)]:
                H = 2.0 * X[id(lin)].T @ X[id(lin)] / X[id(lin)].shape[0]
                lin.weight.copy_(gptq_quantize(lin.weight, H, 3, 32))
    for (name, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    # block 1 of the result must differ from GPTQ run on the ORIGINAL model's block-1 inputs (non-sequential)
    nonseq = copy.deepcopy(tiny)
    X = _block_inputs(nonseq, decoder_layers(nonseq)[1], calib)
    lin = decoder_layers(nonseq)[1].mlp.down_proj
    H = 2.0 * X[id(lin)].T @ X[id(lin)] / X[id(lin)].shape[0]
    assert not torch.equal(gptq_quantize(lin.weight, H, 3, 32), decoder_layers(fast)[1].mlp.down_proj.weight)


def test_gptq_is_deterministic_and_records_info(tiny: nn.Module, calib, quantized) -> None:
    a, info = quantized("gptq-w3-g32")
    b = GPTQ(bits=3, group=32).apply(copy.deepcopy(tiny), CompressContext(calibration=calib))
    for (name, p), (_, r) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, r), name
    changed = [
        n
        for (n, p), (_, o) in zip(a.named_parameters(), tiny.named_parameters(), strict=True)
        if not torch.equal(p, o)
    ]
    assert all(".layers." in n and n.endswith("proj.weight") for n in changed)
    assert len(changed) == 14
    assert info["effective_bits"] == pytest.approx(3 + (16 + 3) / 32)
    assert info["gptq"]["calib_tokens"] == 4 * 64
    assert info["gptq"]["damp"] == 0.01 and info["gptq"]["block_size"] == 128


def test_gptq_quantizes_included_lm_head(tiny: nn.Module, calib) -> None:
    ctx = CompressContext(calibration=calib, include=("*layers.*", "lm_head"))
    q = GPTQ(bits=4, group=16).apply(copy.deepcopy(tiny), ctx)
    assert not torch.equal(q.lm_head.weight, tiny.lm_head.weight)
    assert _levels_per_group(q.lm_head.weight.detach(), 16) <= 16


def test_gptq_needs_calibration_and_a_dividing_group(tiny: nn.Module, calib) -> None:
    assert GPTQ.needs_calibration
    with pytest.raises(MethodError, match="calibration"):
        GPTQ().apply(copy.deepcopy(tiny), CompressContext())
    with pytest.raises(MethodError, match="divide"):
        parse_method("gptq-w4-g48").apply(copy.deepcopy(tiny), CompressContext(calibration=calib))


@pytest.mark.parametrize(
    "bad", ["gptq-w1-g128", "gptq-w9-g128", "gptq-w4", "gptq-w4-g", "gptq-w4-g128-asym", "gptq-wx-g128"]
)
def test_bad_ids_raise(bad: str) -> None:
    with pytest.raises(MethodError):
        parse_method(bad)


@pytest.mark.parametrize("mid", ["gptq-w3-g128", "gptq-w4-g128", "gptq-w8-g0-sym", "gptq-w2-g32"])
def test_ids_round_trip(mid: str) -> None:
    m = parse_method(mid)
    assert isinstance(m, GPTQ)
    assert m.id == mid
    assert parse_method(m.id) == m
