"""Adapters to quantization libraries (methods/lib_*.py): availability, parity with the built-in methods on one
nn.Linear, the two modes, and a harness run on the tiny model. A library that does not import here skips its
tests with the reason and the pip command; the availability tests run everywhere."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from lcc_harness.cli import main as lcc_main
from lcc_harness.errors import MethodError
from lcc_harness.methods import CompressContext, families, parse_method
from lcc_harness.methods._adapters import LibraryMethod
from lcc_harness.methods._quant import fake_quant_groups, quant_params, quantize_dequantize
from lcc_harness.methods.lib_bnb import BNB
from lcc_harness.methods.lib_hqq import HQQ
from lcc_harness.methods.lib_quanto import QUANTO
from lcc_harness.methods.lib_torchao import TORCHAO
from lcc_harness.methods.registry import Library, register, unavailable, unregister


def needs(lib: Library) -> pytest.MarkDecorator:
    why = lib.missing()
    return pytest.mark.skipif(why is not None, reason=f"{lib.dist}: {why}; install it: {lib.install}")


# ---- availability (no library needed) -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Ghost(LibraryMethod):
    bits: int = 4
    family, forms, examples = "ghost", ("ghost-w{bits}",), ("ghost-w4",)
    description = "a family whose library is never installed"
    library = Library("lcc_no_such_library", "no-such-library", "1.2.3")


@pytest.fixture
def ghost():
    register(_Ghost)
    yield
    unregister("ghost")


def test_a_family_whose_library_is_missing_is_listed_unavailable_with_its_pip_command(ghost, capsys):
    assert "ghost" not in families() and "ghost" in unavailable()
    with pytest.raises(MethodError) as e:
        parse_method("ghost-w4")
    msg = str(e.value)
    assert "\n" not in msg and "no-such-library" in msg and "pip install no-such-library==1.2.3" in msg
    assert "lcc-harness[adapters]" in msg
    assert lcc_main(["methods"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ghost"))
    assert "UNAVAILABLE" in row and "pip install no-such-library==1.2.3" in row


def test_an_import_that_fails_is_reported_not_raised():
    lib = Library("json.no_such_submodule", "json", "0")
    assert lib.missing().startswith("import json.no_such_submodule failed: ModuleNotFoundError")


# ---- one nn.Linear ------------------------------------------------------------------------------------------
def _one(in_f: int = 576, out_f: int = 256) -> nn.Module:
    """A model holding one target Linear (out_f, in_f), name 'layers.0', Gaussian weights of std 0.02 (SmolLM2's
    widths: 576 in)."""
    g = torch.Generator().manual_seed(0)
    root = nn.Module()
    root.layers = nn.ModuleList([nn.Linear(in_f, out_f)])
    with torch.no_grad():
        root.layers[0].weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
        root.layers[0].bias.copy_(torch.randn(out_f, generator=g) * 0.02)
    return root


X = torch.randn(8, 576, generator=torch.Generator().manual_seed(1))  # (B, I)


def _float_weight(lin: nn.Module) -> torch.Tensor:
    """The float values (O, I) of a target after a method: a plain Linear's weight, or the library's module or
    tensor subclass dequantized (HQQLinear, bnb Linear4bit / Linear8bitLt, quanto QLinear, torchao tensors)."""
    name = type(lin).__name__
    if name == "HQQLinear":
        return lin.dequantize()
    w = lin.weight
    if name == "Linear4bit":
        import bitsandbytes.functional as F

        return F.dequantize_4bit(w.data, w.quant_state)
    if name == "Linear8bitLt":
        return w.CB.float() * (w.SCB[:, None] / 127)
    return w.dequantize() if type(w) not in (torch.Tensor, nn.Parameter) else w


def _apply(method_id: str, base: nn.Module) -> tuple[nn.Module, torch.Tensor, dict]:
    """`method_id` applied to a copy of `base`: (model, the target's weight as float values (O, I), method_info)."""
    ctx = CompressContext()
    out = parse_method(method_id).apply(copy.deepcopy(base), ctx)
    return out, _float_weight(out.layers[0]).detach().reshape(256, 576), ctx.info


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def _ties_only(a: torch.Tensor, b: torch.Tensor, bits: int, group: int, w: torch.Tensor) -> None:
    """a and b equal (to float rounding, 1e-7) except in at most 1 of 10⁴ weights, each off by one grid step:
    x/s against x·(1/s) (or a different float order) rounds a value that lies on a half step either way."""
    d = (a - b).detach().abs()
    d = torch.where(d > 1e-7, d, torch.zeros_like(d))
    s, _ = quant_params(w.reshape(w.shape[0], -1, group if group else w.shape[1]), bits, sym=False)
    assert int((d > 0).sum()) <= d.numel() // 10_000, int((d > 0).sum())
    assert float(d.max()) <= float(s.max()) * 1.001


@needs(TORCHAO)
@pytest.mark.parametrize(
    "bits,group", [(2, 32), (3, 0), (4, 64), (8, 64)], ids=["w2-g32", "w3-g0", "w4-g64", "w8-g64"]
)
def test_torchao_intx_is_rtn(bits, group):
    """IntxWeightOnlyConfig ASYMMETRIC per group = rtn's grid (min-max, integer zero point): the same weights
    up to rounding ties (measured: 1 of 147456 at w4-g64, none at the others), the same bits."""
    base = _one()
    _, w, info = _apply(f"torchao-w{bits}-g{group}", base)
    _, r, rinfo = _apply(f"rtn-w{bits}-g{group}", base)
    _ties_only(w, r, bits, group, base.layers[0].weight)
    assert info["effective_bits"] == rinfo["effective_bits"]
    assert info["mode"] == "dequantized" and info["library"] == f"torchao=={TORCHAO.version()}"


@needs(TORCHAO)
def test_torchao_int8wo_is_symmetric_int8_with_a_127_5_scale():
    """Int8WeightOnlyConfig is rtn-w8-g0-sym's format with another scale: torchao's symmetric scale is
    max|w| / 127.5 ((qmax − qmin)/2), rtn's max|w| / 127; with that scale the weights are equal up to ties (measured:
    19 of 147456 one step off: torchao divides by a scale it computed in another order; asserted ≤ 1 in 1000, one
    step each), and the error differs by < 2 % (measured: MSE ratio 0.994)."""
    base = _one()
    w0 = base.layers[0].weight.detach()
    _, w, _ = _apply("torchao-int8wo", base)
    s = w0.abs().amax(1, keepdim=True) / 127.5  # (O, 1)
    ref = quantize_dequantize(w0, s, torch.zeros_like(s), 8, sym=True)
    d = (w - ref).abs()
    assert int((d > 1e-9).sum()) <= w.numel() // 1000 and bool((d <= s * 1.001).all()), int((d > 1e-9).sum())
    _, r, _ = _apply("rtn-w8-g0-sym", base)
    assert _mse(w, w0) / _mse(r, w0) == pytest.approx(1.0, abs=0.02)


@needs(TORCHAO)
def test_torchao_w8a8_matches_the_harness_w8a8_in_error_not_in_rounding():
    """Int8DynamicActivationInt8WeightConfig against the harness's `w8a8` (per-row symmetric int8 weights,
    per-token symmetric int8 activations): the same scheme but torchao's scales are max/127.5, the harness's
    max/127, so the rounding grids differ and every output is rounded differently. Measured on this Linear: output
    error vs float 1.037 % (torchao) and 1.052 % (harness), 1.13 % between them. Asserted: the two errors within
    10 % of each other, and the two outputs no further apart than 1.5× that error (independent errors of equal size
    would be √2 ≈ 1.41× apart)."""
    base = _one()
    k, _, info = _apply("torchao-w8a8", base)
    h, _, _ = _apply("w8a8", base)
    with torch.no_grad():
        y0, yk, yh = base.layers[0](X), k.layers[0](X), h.layers[0](X)  # (B, O)
    ek, eh = float((yk - y0).norm() / y0.norm()), float((yh - y0).norm() / y0.norm())
    assert ek == pytest.approx(eh, rel=0.1)
    assert float((yk - yh).norm() / y0.norm()) < 1.5 * max(ek, eh)
    assert info["mode"] == "kernel"


@needs(HQQ)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_hqq_min_max_is_rtn_and_its_optimizer_lowers_the_error(bits):
    """Without its optimizer and with an integer zero point, HQQ's grid is rtn's (same weights up to ties). The
    family's default runs the half-quadratic fit (and keeps a float zero point except at 4 bits): on these Gaussian
    weights it lowers the squared error by 9–11 % at every width (measured MSE ratios to rtn 0.891 w2, 0.896 w3,
    0.914 w4, 0.892 w8); asserted: ratio in [0.8, 0.97]. Bits: b + 32/G (fp16 scale and zero)."""
    from lcc_harness.methods.lib_hqq import hqq_linear

    base = _one()
    w0 = base.layers[0].weight.detach()
    plain = (
        hqq_linear(base.layers[0], bits, 64, optimize=False, round_zero=True).dequantize().reshape(w0.shape)
    )
    rtn = fake_quant_groups(w0, bits, 64)
    _ties_only(plain, rtn, bits, 64, w0)
    _, w, info = _apply(f"hqq-w{bits}-g64", base)
    assert 0.8 <= _mse(w, w0) / _mse(rtn, w0) <= 0.97
    assert info["effective_bits"] == pytest.approx(bits + 32 / 64)


@needs(BNB)
def test_bnb_int8_is_rtn_w8_per_channel_symmetric_of_the_float16_weight():
    """int8_vectorwise_quant is absmax per row to ±127 = rtn-w8-g0-sym, applied (like bnb's Int8Params, which the
    -kernel mode uses) to the weight rounded to float16 first: equal weights to rtn-w8-g0-sym of that float16
    weight up to float16 rounding ties (bitsandbytes scales in float16: measured 11 of 147456 codes one step off;
    asserted ≤ 1 in 10⁴, one step each; against the float32 weight nearly every value moves by a fraction of a
    step: the row scales differ by the float16 rounding of the row's absmax). Bits: bitsandbytes keeps the row scale in
    float32 (8 + 32/I); rtn counts fp16."""
    base = _one()
    _, w, info = _apply("bnb-int8", base)
    half = copy.deepcopy(base)
    with torch.no_grad():
        half.layers[0].weight.copy_(half.layers[0].weight.half().float())
    _, r, _ = _apply("rtn-w8-g0-sym", half)
    d, step = (
        (w - r).abs(),
        half.layers[0].weight.detach().abs().amax(1, keepdim=True) / 127,
    )  # (O, I), (O, 1)
    assert int((d > 1e-9).sum()) <= d.numel() // 10_000 and bool((d <= step * 1.001).all())
    assert info["effective_bits"] == pytest.approx(8 + 32 / 576)


NF4 = torch.tensor(  # bitsandbytes' NF4 code book (quantiles of N(0, 1), scaled to [-1, 1])
    [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
     0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
)  # fmt: skip


@needs(BNB)
def test_bnb_nf4_sits_on_the_nf4_levels_and_beats_uniform_4bit_on_gaussian_weights():
    """No built-in method has NF4's levels: each block of 64 weights is w / absmax mapped to the nearest of 16
    normal quantiles. Checked: every dequantized weight is absmax × an NF4 level. Against the uniform symmetric
    4-bit grid with the same block absmax (rtn-w4-g64-sym) on Gaussian weights, NF4 spends its levels where the
    weights are: measured MSE ratio 0.731 (to asymmetric rtn-w4-g64: 1.021, which has 16 levels over [min, max]
    where the symmetric grid uses 15 over ±absmax). Asserted: ratio to rtn-w4-g64-sym in [0.65, 0.8]; FP4 (e2m1
    levels, coarse near the absmax) is worse than the uniform grid: measured 1.286, asserted in [1.15, 1.45]."""
    base = _one()
    w0 = base.layers[0].weight.detach()
    _, w, info = _apply("bnb-nf4", base)
    absmax = w0.reshape(-1, 64).abs().amax(1, keepdim=True)  # (O·I/64, 1)
    levels = w.reshape(-1, 64) / absmax
    assert float((levels[..., None] - NF4).abs().amin(-1).max()) < 1e-5
    _, r, _ = _apply("rtn-w4-g64-sym", base)
    assert 0.65 <= _mse(w, w0) / _mse(r, w0) <= 0.8
    _, f, _ = _apply("bnb-fp4", base)
    assert 1.15 <= _mse(f, w0) / _mse(r, w0) <= 1.45
    assert info["effective_bits"] == 4.5 and parse_method("bnb-nf4-b128").blocksize == 128


@needs(QUANTO)
def test_quanto_w8_is_rtn_w8_per_channel_symmetric_and_w4_is_close_to_rtn():
    """qint8 is per-row symmetric absmax/127 = rtn-w8-g0-sym (measured: all equal). qint4 picks its group (96 for
    a 576-wide input) and keeps a float shift instead of an integer zero point: measured MSE ratio to rtn-w4-g96
    0.978; asserted in [0.9, 1.0] (a float zero point can only place the grid at least as well as a rounded one
    for min-max)."""
    base = _one()
    _, w8, _ = _apply("quanto-w8", base)
    _, r8, _ = _apply("rtn-w8-g0-sym", base)
    assert torch.equal(w8, r8)
    w0 = base.layers[0].weight.detach()
    _, w4, info = _apply("quanto-w4", base)
    assert info["quanto_group_sizes"] == [96] and info["effective_bits"] == pytest.approx(4 + 32 / 96)
    assert 0.9 <= _mse(w4, w0) / _mse(fake_quant_groups(w0, 4, 96), w0) <= 1.0


KERNELS = [
    pytest.param("torchao-w4-g64", 1e-6, marks=needs(TORCHAO)),
    pytest.param("torchao-int8wo", 1e-6, marks=needs(TORCHAO)),
    pytest.param("hqq-w4-g64", 1e-6, marks=needs(HQQ)),
    pytest.param("bnb-nf4", 1e-6, marks=needs(BNB)),
    pytest.param("bnb-fp4", 1e-6, marks=needs(BNB)),
    pytest.param("bnb-int8", 1e-2, marks=needs(BNB)),
    pytest.param("quanto-w4", 1e-6, marks=needs(QUANTO)),
    pytest.param("quanto-w8", 1e-6, marks=needs(QUANTO)),
]


@pytest.mark.parametrize("method,tol", KERNELS)
def test_kernel_mode_computes_what_the_dequantized_weights_compute(method, tol):
    """`-kernel` keeps the library's module in the forward; on one Linear its output equals the dequantized
    mode's (measured: identical for all but torchao-int8wo, 1.7e-7 relative: float order in its int8 matmul,
    and bnb-int8, 2.3e-3: LLM.int8() also rounds the activations to int8 per token)."""
    base = _one()
    k, wk, ik = _apply(f"{method}-kernel", base)
    d, wd, idq = _apply(method, base)
    assert isinstance(d.layers[0], nn.Linear) and type(d.layers[0].weight) is nn.Parameter
    assert torch.equal(wk, wd) and ik["effective_bits"] == idq["effective_bits"]
    assert (ik["mode"], idq["mode"]) == ("kernel", "dequantized")
    with torch.no_grad():
        yk, yd = k.layers[0](X), d.layers[0](X)  # (B, O)
    assert float((yk - yd).norm() / yd.norm()) <= tol


# ---- the harness on the tiny model ---------------------------------------------------------------------------
HARNESS = [
    pytest.param(m, marks=needs(lib))
    for lib, ids in [
        (TORCHAO, ["torchao-w4-g32", "torchao-w4-g32-kernel", "torchao-w8a8"]),
        (HQQ, ["hqq-w4-g32", "hqq-w4-g32-kernel"]),
        (BNB, ["bnb-nf4", "bnb-nf4-kernel", "bnb-int8-kernel"]),
        (QUANTO, ["quanto-w4", "quanto-w4-kernel"]),
    ]
    for m in ids
]


@pytest.fixture(scope="module")
def pair():
    """Two harnesses on the tiny model (lengths 32, 64, 128; 2 samples): in place, and on a deep copy."""
    from lcc_harness.engines.results import RunConfig
    from lcc_harness.engines.torch.harness import Harness
    from lcc_harness.models.load import load_model

    def cfg(**kw):
        return RunConfig(
            model="tiny-llama", lengths=(32, 64, 128), samples=2, device="cpu", use_cache=False, **kw
        )

    return Harness(cfg(), lm=load_model("tiny-llama", "cpu")), Harness(
        cfg(in_place=False), lm=load_model("tiny-llama", "cpu")
    )


@pytest.mark.parametrize("method", HARNESS)
def test_the_harness_runs_it_in_place_and_puts_the_model_back(pair, method):
    """Both modes through Harness.run: compressing in place gives the deep copy's KL (> 0) and the reference model
    comes back exactly (snapshot.restore undoes swapped modules and parameters)."""
    inplace, copied = pair
    before = {k: v.detach().clone() for k, v in inplace.lm.model.state_dict().items()}
    a, b = inplace.run(method), copied.run(method)
    for L in inplace.lengths:
        assert a.stats[L].per_sample == b.stats[L].per_sample and a.stats[L].window_kl > 0, (method, L)
    after = inplace.lm.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m) is not nn.Linear or type(m.weight) is nn.Parameter for m in inplace.lm.model.modules())
