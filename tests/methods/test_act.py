"""Weight-activation quantization (w{b}a{c}) and SmoothQuant: levels, exact smoothing, copies, ids."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcc_harness.errors import MethodError
from lcc_harness.methods import CompressContext, parse_method
from lcc_harness.methods._calib import collect_input_stats
from lcc_harness.methods._targets import iter_linears
from lcc_harness.methods.act import ActQuantizer, ActQuantLinear, SmoothQuant, WeightActQuant, smooth_
from lcc_harness.methods.act import smoothing_consumers as consumers
from lcc_harness.models.load import build_tiny_llama


def calib(n: int = 4, length: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, 256, (length,), generator=g) for _ in range(n))


def eval_ids(seed: int = 7, length: int = 96) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids=eval_ids() if ids is None else ids, use_cache=False).logits[0].float()  # (T, V)


def compress(model: nn.Module, method_id: str) -> tuple[nn.Module, CompressContext]:
    m = parse_method(method_id)
    ctx = CompressContext(calibration=calib() if m.needs_calibration else ())
    return m.apply(model, ctx), ctx


@torch.no_grad()
def with_outliers(model: nn.Module, factor: float = 40.0) -> nn.Module:
    """Give every block's norms a few huge channels, as real LLMs have: what SmoothQuant is for."""
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight[[3, 17, 41]] *= factor
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("w8a8", "w8a8"),
        ("w4a8", "w4a8"),
        ("w2a16", "w2a16"),
        ("smoothquant-w8a8-a0.5", "smoothquant-w8a8-a0.5"),
        ("smoothquant-w8a8-a0.75", "smoothquant-w8a8-a0.75"),
        ("smoothquant-w8a8-a0.50", "smoothquant-w8a8-a0.5"),
        ("smoothquant-w8a8-a1", "smoothquant-w8a8-a1"),
        ("smoothquant-w8a8", "smoothquant-w8a8-a0.5"),
        ("smoothquant-w4a8-a0.85", "smoothquant-w4a8-a0.85"),
    ],
)
def test_ids_round_trip(text: str, canonical: str) -> None:
    m = parse_method(text)
    assert m.id == canonical
    assert parse_method(m.id) == m


def test_ids_parse_to_the_right_parameters() -> None:
    assert parse_method("w4a8") == WeightActQuant(w_bits=4, a_bits=8)
    assert parse_method("smoothquant-w8a8-a0.75") == SmoothQuant(alpha=0.75, w_bits=8, a_bits=8)
    assert SmoothQuant.needs_calibration and not WeightActQuant.needs_calibration


@pytest.mark.parametrize(
    "bad",
    [
        "w1a8",
        "w8a1",
        "w9a8",
        "w8a17",
        "w0a8",
        "a0",
        "a1.5",
        "smoothquant-w8a8-a0",
        "smoothquant-w8a8-a1.5",
        "smoothquant-w8a8-a0.001",
        "smoothquant-w9a8-a0.5",
        "smoothquant-w8a1-a0.5",
        "w8a8-a0.5",
        "w8",
    ],
)
def test_bad_ids_raise(bad: str) -> None:
    with pytest.raises(MethodError):
        parse_method(bad)


def test_out_of_range_message_names_the_form() -> None:
    with pytest.raises(MethodError, match=r"w\{2\.\.8\}a\{2\.\.16\}"):
        parse_method("w9a8")
    with pytest.raises(MethodError, match=r"alpha"):
        parse_method("smoothquant-w8a8-a1.5")


# ---------------------------------------------------------------- w{b}a{c}


@pytest.mark.parametrize("method_id, a_bits", [("w8a8", 8), ("w4a4", 4)])
def test_linear_inputs_are_quantized_per_token(model: nn.Module, method_id: str, a_bits: int) -> None:
    """Every target's matmul sees x_q with x_q / (max|x_token| / qmax) integer in [-qmax, qmax]."""
    model, _ = compress(model, method_id)
    targets = list(iter_linears(model))
    assert len(targets) == 14 and all(isinstance(lin, ActQuantLinear) for _, lin in targets)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for name, lin in targets:

        def hook(mod: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
            x = args[0].reshape(-1, mod.in_features)  # (tokens, in)
            xq = mod.input_quant(x)
            seen[name] = (x, xq, out.reshape(-1, mod.out_features))

        hooks.append(lin.register_forward_hook(hook))
    logits(model)
    for h in hooks:
        h.remove()
    assert set(seen) == {n for n, _ in targets}
    qmax = 2 ** (a_bits - 1) - 1
    for name, (x, xq, out) in seen.items():
        lin = model.get_submodule(name)
        scale = x.abs().amax(-1, keepdim=True) / qmax  # (tokens, 1)
        q = xq / scale
        assert torch.allclose(q, q.round(), atol=1e-3), name
        assert q.abs().max() <= qmax + 1e-3, name
        levels = max(len(torch.unique(row.round())) for row in q)
        assert levels <= 2**a_bits, (name, levels)
        assert (xq - x).abs().le(scale / 2 * (1 + 1e-4) + 1e-7).all(), name  # rounding to nearest
        assert not torch.equal(xq, x), name  # something was actually rounded
        # the Linear's output is computed from the quantized input, not the raw one
        torch.testing.assert_close(out, F.linear(xq, lin.weight, lin.bias))
        assert (out - F.linear(x, lin.weight, lin.bias)).abs().max() > 0, name


def test_quantizer_module_output_has_few_levels_per_token() -> None:
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(1)) * 3
    xq = ActQuantizer(8)(x)
    for row, rq in zip(x, xq, strict=True):
        assert len(torch.unique(rq)) <= 256
        q = rq / (row.abs().max() / 127)
        assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= 127 + 1e-4


@pytest.mark.parametrize("method_id, w_bits", [("w8a8", 8), ("w4a8", 4), ("smoothquant-w8a8-a0.5", 8)])
def test_weights_are_per_channel_symmetric(model: nn.Module, method_id: str, w_bits: int) -> None:
    before = {n: lin.weight.detach().clone() for n, lin in iter_linears(model)}
    model, ctx = compress(model, method_id)
    qmax = 2 ** (w_bits - 1) - 1
    for name, lin in iter_linears(model):
        w = lin.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / qmax  # (out, 1)
        q = w / scale
        assert torch.allclose(q, q.round(), atol=1e-3), name
        assert q.abs().max() <= qmax + 1e-3, name
        assert max(len(torch.unique(row)) for row in w) <= 2 * qmax + 1, name
        if not method_id.startswith("smoothquant"):  # smoothing rescales columns first
            orig_scale = before[name].abs().amax(1, keepdim=True) / qmax
            assert (w - before[name]).abs().le(orig_scale / 2 * (1 + 1e-4)).all(), name
            assert not torch.equal(w, before[name]), name
    lins = [lin for _, lin in iter_linears(model)]
    scale_bits = 16 * sum(lin.out_features for lin in lins) / sum(lin.weight.numel() for lin in lins)
    assert ctx.info["effective_bits"] == pytest.approx(w_bits + scale_bits)  # one fp16 scale per row
    assert ctx.info["act_bits"] == 8


def test_error_grows_as_bits_shrink(tiny_model: nn.Module) -> None:
    ref = logits(tiny_model)
    errs = [
        rel_err(logits(compress(copy.deepcopy(tiny_model), mid)[0]), ref)
        for mid in ("w8a16", "w8a8", "w4a8", "w4a4")
    ]
    assert 0 < errs[0] < errs[1] < errs[2] < errs[3], errs


def test_lm_head_and_excluded_targets_are_left_alone(model: nn.Module) -> None:
    head = model.lm_head.weight.detach().clone()
    ctx = CompressContext(exclude=("*mlp*",))
    parse_method("w8a8").apply(model, ctx)
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, head)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and "layers" in name:
            assert isinstance(mod, ActQuantLinear) == ("mlp" not in name), name


# ---------------------------------------------------------------- copies


def test_compressing_a_copy_leaves_the_reference_alone(tiny_model: nn.Module) -> None:
    ref_logits = logits(tiny_model)
    ref_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    for mid in ("w8a8", "smoothquant-w8a8-a0.5"):
        cmp, _ = compress(copy.deepcopy(tiny_model), mid)
        assert not torch.equal(logits(cmp), ref_logits)
    assert all(type(m) is not ActQuantLinear for m in tiny_model.modules())
    assert all(torch.equal(v, ref_state[k]) for k, v in tiny_model.state_dict().items())
    assert torch.equal(logits(tiny_model), ref_logits)


def test_deepcopy_of_a_compressed_model(model: nn.Module) -> None:
    names = [n for n, _ in iter_linears(model)]
    cmp, _ = compress(model, "w8a8")
    assert [n for n, _ in iter_linears(cmp)] == names  # still Linears for the target helper
    twin = copy.deepcopy(cmp)
    out = logits(cmp)
    assert torch.equal(logits(twin), out)
    # the twin is independent: changing its quantizers or weights does not touch the original
    for _, lin in iter_linears(twin):
        lin.input_quant.bits = 3
        assert lin.weight.data_ptr() != cmp.get_submodule(_).weight.data_ptr()
    assert not torch.equal(logits(twin), out)
    assert torch.equal(logits(cmp), out)


# ---------------------------------------------------------------- smoothing


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothing_alone_keeps_logits(model: nn.Module, alpha: float, outliers: bool) -> None:
    if outliers:
        with_outliers(model)
    ref = logits(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = collect_input_stats(model, consumers(model), calib())
    done = smooth_(model, stats, alpha)
    assert done == {"qkv": 2, "o_proj": 2, "gate_up": 2, "down_proj": 2}
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    for part in (
        "input_layernorm",
        "post_attention_layernorm",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ):
        assert sum(part in k for k in changed) == 2, part  # every fold happened, in both layers
    out = logits(model)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() <= 1e-4


def test_gqa_value_scales_are_shared_by_query_heads(model: nn.Module) -> None:
    """v rows ÷ s and o columns × s: the o scales repeat per kv head (4 heads, 2 kv heads, head_dim 16)."""
    o_before = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    v_before = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    smooth_(model, collect_input_stats(model, consumers(model), calib()), 0.5)
    s_o = model.model.layers[0].self_attn.o_proj.weight[0] / o_before[0]  # (64,) = 4 heads × 16
    s_v = v_before[:, 0] / model.model.layers[0].self_attn.v_proj.weight[:, 0]  # (32,) = 2 kv heads × 16
    s_o = s_o.view(2, 2, 16)
    torch.testing.assert_close(s_o[:, 0], s_o[:, 1])
    s_o = s_o[:, 0].reshape(-1)
    torch.testing.assert_close(s_o / s_o[0], s_v / s_v[0])  # v's column 0 also carries the q/k/v scale
    assert s_v.std() > 0  # a real per-channel scale, not a constant


def imbalance(absmax: torch.Tensor) -> float:
    """max / median of per-channel activation abs-maxima: how hard per-token quantization is."""
    return (absmax.max() / absmax.median()).item()


def test_smoothing_lowers_activation_imbalance(model: nn.Module) -> None:
    with_outliers(model)
    before = collect_input_stats(model, consumers(model), calib())
    smooth_(model, before, 0.5)
    after = collect_input_stats(model, consumers(model), calib())
    for name in before:
        if name.endswith(("q_proj", "gate_proj")):  # the inputs with injected outliers
            assert imbalance(after[name].absmax) < 0.5 * imbalance(before[name].absmax), name
    ratio = torch.tensor([imbalance(after[n].absmax) / imbalance(before[n].absmax) for n in before])
    assert ratio.log().mean().exp() < 0.7, ratio


def test_smoothquant_beats_plain_w8a8_with_outliers(tiny_model: nn.Module) -> None:
    base = with_outliers(copy.deepcopy(tiny_model))
    ref = logits(base)
    plain = rel_err(logits(compress(copy.deepcopy(base), "w8a8")[0]), ref)
    smooth = rel_err(logits(compress(copy.deepcopy(base), "smoothquant-w8a8-a0.5")[0]), ref)
    assert smooth < 0.7 * plain, (smooth, plain)


def test_smoothquant_records_what_it_did(model: nn.Module) -> None:
    _, ctx = compress(model, "smoothquant-w8a8-a0.5")
    assert ctx.info["smoothed_qkv"] == ctx.info["smoothed_down_proj"] == 2
    assert 0 <= ctx.info["smoothing_rel_error"] < 1e-4


def test_smoothquant_skips_groups_with_no_target(model: nn.Module) -> None:
    ln = model.model.layers[0].post_attention_layernorm.weight.detach().clone()
    ctx = CompressContext(calibration=calib(), exclude=("*mlp*",))
    parse_method("smoothquant-w8a8-a0.5").apply(model, ctx)
    assert ctx.info["smoothed_gate_up"] == ctx.info["smoothed_down_proj"] == 0
    assert ctx.info["smoothed_qkv"] == 2
    assert torch.equal(model.model.layers[0].post_attention_layernorm.weight, ln)


def test_smoothquant_needs_calibration(model: nn.Module) -> None:
    with pytest.raises(MethodError, match="calibration"):
        parse_method("smoothquant-w8a8-a0.5").apply(model, CompressContext())


def test_smoothquant_rejects_non_llama_blocks() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320, n_positions=64))
    with pytest.raises(MethodError, match="Llama-style"):
        parse_method("smoothquant-w8a8-a0.5").apply(gpt2, CompressContext(calibration=calib()))


def test_smoothquant_rejects_norms_it_cannot_fold_into() -> None:
    """Gemma's RMSNorm multiplies by (1 + weight): dividing the weight by s would not divide the output."""
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    torch.manual_seed(0)
    gemma = GemmaForCausalLM(cfg)
    with pytest.raises(MethodError, match="does not scale linearly"):
        parse_method("smoothquant-w8a8-a0.5").apply(gemma, CompressContext(calibration=calib()))


def test_smoothing_works_in_bfloat16() -> None:
    m = build_tiny_llama().to(torch.bfloat16)
    ref = logits(m)
    smooth_(m, collect_input_stats(m, consumers(m), calib()), 0.5)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert rel_err(logits(m), ref) < 0.05
