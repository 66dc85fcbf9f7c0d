"""Numerics of the measure beyond float32 Llama: bf16 models, other families' output heads, length-dependent
compressed models, GPT-2 Conv1D targets, methods that find no target, methods that touch global state."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import pytest
import torch
from _tiny import tiny_config
from torch import nn

from lcc_harness.engines.torch.harness import Harness
from lcc_harness.errors import MethodError, MethodRunError
from lcc_harness.measure.head import (
    check_head,
    compare_summary,
    final_hidden,
    output_head,
    own_logits_head,
    shared_linear_head,
    summarize_reference,
)
from lcc_harness.measure.kl import compare
from lcc_harness.methods.basic import RTN
from lcc_harness.methods.registry import CompressContext, Method
from lcc_harness.models.load import ByteTokenizer, LoadedModel, build_tiny_llama, load_model

IDS = torch.arange(200, dtype=torch.long) * 37 % 256  # (200,) byte-range tokens


def loaded(model: nn.Module, name: str = "custom") -> LoadedModel:
    model.eval().requires_grad_(False)
    dtype = next(model.parameters()).dtype
    return LoadedModel(name, model, ByteTokenizer(), "test", torch.device("cpu"), dtype, 4096)


# ---- bf16: the head, log-softmax and KL run in float32 -----------------------------------------------------


def _kl64(
    model_ref: nn.Module, model_cmp: nn.Module, h_ref: torch.Tensor, h_cmp: torch.Tensor
) -> torch.Tensor:
    """Per-position KL in float64 from the same (bf16) hidden states: the exact value the float32 path targets."""
    w_ref = model_ref.get_output_embeddings().weight.double()
    w_cmp = model_cmp.get_output_embeddings().weight.double()
    lp_ref = torch.log_softmax(h_ref.double() @ w_ref.T, -1)
    lp_cmp = torch.log_softmax(h_cmp.double() @ w_cmp.T, -1)
    return (lp_ref.exp() * (lp_ref - lp_cmp)).sum(-1)


@pytest.fixture(scope="module")
def bf16_pair():
    ref = load_model("tiny-llama", "cpu", "bfloat16").model
    cmp = RTN(bits=8, group=32).apply(copy.deepcopy(ref), CompressContext())
    h_ref, h_cmp = final_hidden(ref, IDS), final_hidden(cmp, IDS)
    assert h_ref.dtype == torch.bfloat16
    return ref, cmp, h_ref, h_cmp


def test_bf16_direct_path_is_nonnegative_and_matches_float64(bf16_pair):
    ref, cmp, h_ref, h_cmp = bf16_pair
    kl = compare(output_head(ref), output_head(cmp), h_ref, h_cmp, IDS).kl
    exact = _kl64(ref, cmp, h_ref, h_cmp)
    assert float(kl.min()) >= -1e-5  # no clamping anywhere
    w = slice(100, 200)
    assert float(kl[w].double().mean()) == pytest.approx(float(exact[w].mean()), rel=0.01)


def test_bf16_summary_path_is_nonnegative_and_matches_float64(bf16_pair):
    ref, cmp, h_ref, h_cmp = bf16_pair
    assert shared_linear_head(ref, cmp)
    summ = summarize_reference(ref, h_ref, IDS, chunk=64)
    kl = compare_summary(summ, output_head(cmp), h_ref, h_cmp, IDS).kl
    exact = _kl64(ref, cmp, h_ref, h_cmp)
    assert float(kl.min()) >= -1e-5
    w = slice(100, 200)
    assert float(kl[w].double().mean()) == pytest.approx(float(exact[w].mean()), rel=0.01)


def test_bf16_harness_run_has_no_negative_kl():
    tiny = load_model("tiny-llama", "cpu", "bfloat16")
    h = Harness(tiny_config(dtype="bfloat16"), lm=tiny)
    res = h.run("rtn-w8-g32")
    for st in res.stats.values():
        assert st.window_kl > 0 and min(st.per_sample["window_kl"]) > 0


# ---- output heads of other families -------------------------------------------------------------------------

SMALL = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _family(kind: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "granite":
        return tf.GraniteForCausalLM(tf.GraniteConfig(**SMALL, logits_scaling=8.0, initializer_range=0.2))
    if kind == "cohere":
        return tf.CohereForCausalLM(tf.CohereConfig(**SMALL, logit_scale=0.25, initializer_range=0.2))
    if kind == "gemma2":
        return tf.Gemma2ForCausalLM(
            tf.Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=0.5, initializer_range=0.2)
        )
    if kind == "falcon_h1":
        cfg = tf.FalconH1Config(
            **SMALL,
            lm_head_multiplier=3.0,
            mamba_d_ssm=64,
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_n_groups=1,
            mamba_d_state=16,
            mamba_chunk_size=16,
            initializer_range=0.2,
        )
        return tf.FalconH1ForCausalLM(cfg)
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["granite", "cohere", "gemma2", "falcon_h1"])
def test_output_head_reproduces_the_models_own_logits(kind):
    model = _family(kind).eval()
    ids = IDS[:24]
    with torch.no_grad():
        want = model(input_ids=ids.view(1, -1), use_cache=False).logits[0]
    got = output_head(model)(final_hidden(model, ids))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)
    assert check_head(model, ids) is None


def _scaled_llama() -> nn.Module:
    """Stands for an unknown family: a Llama whose forward multiplies logits by 3 after the head."""
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    model = build_tiny_llama()
    scaled = Scaled(model.config)
    scaled.load_state_dict(model.state_dict())
    return scaled.eval()


def test_unknown_head_falls_back_to_the_models_own_logits_with_a_note():
    model = _scaled_llama()
    ids = IDS[:24]
    note = check_head(model, ids)
    assert note and "model's own logits" in note
    with torch.no_grad():
        want = model(input_ids=ids.view(1, -1), use_cache=False).logits[0]
    torch.testing.assert_close(own_logits_head(model)(final_hidden(model, ids)), want, rtol=1e-5, atol=1e-5)
    h = Harness(tiny_config(), lm=loaded(model, "scaled"))
    res = h.run("rtn-w4-g32")
    assert any("model's own logits" in n for n in res.info["notes"])
    # the KL is that of the ×3 logits: recompute one sample's window directly
    s = h.samples[0]
    cmp = RTN(bits=4, group=32).apply(copy.deepcopy(model), CompressContext())
    L = h.lengths[-1]
    with torch.no_grad():
        lp_r = torch.log_softmax(model(input_ids=s.ids[:L].view(1, -1)).logits[0].double(), -1)
        lp_c = torch.log_softmax(cmp(input_ids=s.ids[:L].view(1, -1)).logits[0].double(), -1)
    direct = float((lp_r.exp() * (lp_r - lp_c)).sum(-1)[L // 2 : L].mean())
    assert res.stats[L].per_sample["window_kl"][0] == pytest.approx(direct, rel=1e-4)


# ---- a compressed model whose outputs depend on the total length ---------------------------------------------


@dataclass(frozen=True)
class PerTensorAct(Method):
    """Adds a per-tensor statistic over all T positions to every MLP input: outputs depend on the length."""

    family, forms = "test-per-tensor", ("test-per-tensor",)

    def apply(self, model, ctx):
        for name, lin in ctx.linears(model):
            if name.endswith("down_proj"):
                lin.register_forward_pre_hook(
                    lambda mod, args: (args[0] + 0.5 * args[0].abs().amax(dim=1, keepdim=True),)
                )
        return model


def test_length_dependent_compressed_model_is_measured_per_length(tiny):
    method = PerTensorAct()
    one = Harness(tiny_config(), lm=tiny)
    with pytest.warns(UserWarning, match="depend on the total length"):
        res = one.run(method)
    assert res.mode == "per-length" and "measured one pass per length" in res.info["length_dependent"]
    naive = Harness(tiny_config(naive=True), lm=tiny).run(method)
    for L in one.lengths:
        assert res.stats[L].per_sample["window_kl"] == pytest.approx(
            naive.stats[L].per_sample["window_kl"], rel=1e-5
        )
    assert one.run("rtn-w4-g32").mode == "one-pass"  # an ordinary method stays one-pass


@dataclass(frozen=True)
class CountedPerTensorAct(PerTensorAct):
    """PerTensorAct that records the length of every pass through the first MLP (into `seen`)."""

    family, forms = "test-per-tensor-counted", ("test-per-tensor-counted",)
    seen: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def apply(self, model, ctx):
        model = super().apply(model, ctx)
        first = next(lin for name, lin in ctx.linears(model) if name.endswith("down_proj"))
        first.register_forward_pre_hook(lambda mod, args: self.seen.append(args[0].shape[1]))
        return model


def test_length_dependence_is_found_after_the_first_sample(tiny):
    """The length probe runs right after sample 0's longest pass: the other samples are never measured one-pass
    (one wasted long pass in all, not one per sample)."""
    method = CountedPerTensorAct()
    h = Harness(tiny_config(samples=3, design="window"), lm=tiny)
    with pytest.warns(UserWarning, match="depend on the total length"):
        res = h.run(method)
    assert res.mode == "per-length"
    Lmax = max(h.lengths)
    # sample 0's one pass, then each sample's per-length pass at Lmax (probing after all samples: 3 + 3)
    assert method.seen.count(Lmax) == 1 + 3, method.seen


# ---- GPT-2 Conv1D layers are targets -------------------------------------------------------------------------


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=300, n_positions=512, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


def test_conv1d_layers_are_targets_and_linearizing_changes_nothing():
    from lcc_harness.methods._targets import iter_linears, linearize_conv1d

    model = _tiny_gpt2()
    ids = IDS[:64].view(1, -1)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert linearize_conv1d(model) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    names = [n for n, _ in iter_linears(model)]
    assert "transformer.h.0.attn.c_attn" in names and len(names) == 8
    h = Harness(tiny_config(), lm=loaded(_tiny_gpt2(), "gpt2"))
    res = h.run("rtn-w3-g32")
    assert all(st.window_kl > 1e-4 and st.top1 < 1 for st in res.stats.values())


def test_a_method_that_finds_no_target_is_an_error(tiny):
    h = Harness(tiny_config(include=("no.such.module*",)), lm=tiny)
    with pytest.raises(MethodError, match=r"no target layers in LlamaForCausalLM.*no\.such\.module\*"):
        h.run("rtn-w4-g32")


# ---- a method that changes the reference model or global state ---------------------------------------------


@dataclass(frozen=True)
class Patcher(Method):
    """Monkeypatches LlamaMLP.forward for every model in the process (the bug this check exists for)."""

    family, forms = "test-patcher", ("test-patcher",)

    def apply(self, model, ctx):
        from transformers.models.llama import modeling_llama

        orig = modeling_llama.LlamaMLP.forward
        modeling_llama.LlamaMLP.forward = lambda self, x: 1.5 * orig(self, x)
        return model


def test_a_method_that_changes_global_state_fails_and_so_do_the_methods_after_it(tiny):
    from transformers.models.llama import modeling_llama

    orig = modeling_llama.LlamaMLP.forward
    h = Harness(tiny_config(), lm=tiny)
    try:
        assert h.run("none").stats[h.lengths[0]].window_kl == 0.0
        with pytest.raises(MethodRunError, match="changed the reference model or global state"):
            h.run(Patcher())
        with pytest.raises(MethodRunError, match="method 'none' changed the reference model"):
            h.run("none")
    finally:
        modeling_llama.LlamaMLP.forward = orig
