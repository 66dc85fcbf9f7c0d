"""KV-cache quantization (kv-k{b}v{c}[-g{G}]): only the cached keys/values change, post-RoPE, per KV head,
with at most 2^b levels per group; the newest block stays exact; outputs are causal and equal a decode loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lcc_harness.errors import MethodError
from lcc_harness.methods import CompressContext, kv, parse_method
from lcc_harness.methods._quant import quant_params
from lcc_harness.methods.kv import ATTR, DEFAULT_GROUP, KVQuant, _make_attention
from lcc_harness.models.load import build_tiny_llama

G = 8  # block size used on the tiny model (head_dim 16)
T = 40  # 5 blocks


@pytest.fixture
def ref(tiny: nn.Module) -> nn.Module:
    return copy.deepcopy(tiny)


def compress(ref: nn.Module, method_id: str) -> tuple[nn.Module, CompressContext]:
    model = copy.deepcopy(ref)
    ctx = CompressContext()
    model = parse_method(method_id).apply(model, ctx)
    return model.eval(), ctx


def tokens(n: int = T, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, n), generator=g)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits[0].float()  # (T, V)


@torch.no_grad()
def capture(model: nn.Module, ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Inputs of every sdpa call (the kv function delegates to sdpa, so it sees the cache it built)."""
    calls: list[dict] = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, attention_mask, **kw):
        calls.append({"q": query.clone(), "k": key.clone(), "v": value.clone(), "mask": attention_mask})
        return sdpa(module, query, key, value, attention_mask, **kw)

    with monkeypatch.context() as mp:
        mp.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa", spy)
        model(input_ids=ids, use_cache=False)
    return calls


def levels_per_group(x: torch.Tensor) -> int:
    """Max number of distinct values over the rows of x (..., n)."""
    rows = x.reshape(-1, x.shape[-1])
    return max(int(torch.unique(r).numel()) for r in rows)


# ---------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("kv-k4v4", "kv-k4v4"),
        ("kv-k2v2", "kv-k2v2"),
        ("kv-k2v4-g32", "kv-k2v4-g32"),
        (f"kv-k8v3-g{DEFAULT_GROUP}", "kv-k8v3"),
        ("kv-k4v2-g128", "kv-k4v2-g128"),
        ("kv-k3v3-swa", "kv-k3v3-swa"),
        ("kv-k3v3-g32-full", "kv-k3v3-g32-full"),
    ],
)
def test_ids_round_trip(text: str, canonical: str) -> None:
    m = parse_method(text)
    assert isinstance(m, KVQuant)
    assert m.id == canonical
    assert parse_method(m.id) == m
    assert parse_method(m.id).id == m.id


@pytest.mark.parametrize(
    "bad",
    ["kv-k1v4", "kv-k4v9", "kv-k4v1", "kv-k9v9", "kv-k4v4-g0", "kv-k4", "kv-k4v4-g", "kv-k4v4-sym", "kvk4v4"],
)
def test_bad_ids_raise(bad: str) -> None:
    with pytest.raises(MethodError) as e:
        parse_method(bad)
    assert "kv-k" in str(e.value)  # the message shows the valid form


def test_group_must_divide_head_dim(ref: nn.Module) -> None:
    with pytest.raises(MethodError, match="divide"):
        compress(ref, "kv-k4v4-g12")  # values: min(12, 16) = 12 does not divide head_dim 16


def test_apply_twice_and_unsupported_attention_raise(ref: nn.Module) -> None:
    model, _ = compress(ref, f"kv-k4v4-g{G}")
    with pytest.raises(MethodError, match="already"):
        parse_method("kv-k2v2").apply(model, CompressContext())
    other = copy.deepcopy(ref)
    other.config._attn_implementation = "flash_attention_2"
    with pytest.raises(MethodError, match="attention implementation"):
        parse_method("kv-k2v2").apply(other, CompressContext())


# ---------------------------------------------------------------- what changes, and only that


def test_weights_and_queries_unchanged_cache_quantized(
    ref: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv, "LSE_PREFILL", False)  # the general route hands sdpa the cache it built
    bits_k, bits_v = 2, 3
    model, ctx = compress(ref, f"kv-k{bits_k}v{bits_v}-g{G}")
    sd_ref, sd = ref.state_dict(), model.state_dict()
    assert sd.keys() == sd_ref.keys()
    for name, t in sd.items():
        assert torch.equal(t, sd_ref[name]), name
    assert ctx.info["kv_key_bits"] == pytest.approx(bits_k + (16 + bits_k) / G)

    ids = tokens()
    c_ref, c_cmp = capture(ref, ids, monkeypatch), capture(model, ids, monkeypatch)
    assert len(c_ref) == len(c_cmp) == 2  # one call per layer
    r, c = c_ref[0], c_cmp[0]  # layer 0: same inputs in both models
    assert torch.equal(c["q"], r["q"])  # queries untouched
    n_kv, hd = 2, 16
    assert c["k"].shape == (1, n_kv, 2 * T, hd)  # per KV head (no GQA repeat), [quantized | exact]
    assert torch.equal(c["k"][:, :, T:], r["k"])  # exact copy = the post-RoPE keys the reference attends to
    assert torch.equal(c["v"][:, :, T:], r["v"])
    kq, vq = c["k"][:, :, :T], c["v"][:, :, :T]
    n = T // G
    # (1, H, n, D, G): one key group (channel, block) per row
    kb = kq[:, :, : n * G].reshape(1, n_kv, n, G, hd).transpose(-1, -2)
    assert levels_per_group(kb) <= 2**bits_k
    vg = vq.reshape(1, n_kv, T, hd // min(G, hd), min(G, hd))  # one value group per row
    assert levels_per_group(vg) <= 2**bits_v
    assert not torch.equal(kq, r["k"]) and not torch.equal(vq, r["v"])
    # quantized from the post-RoPE keys: the error is within half a step of each (channel, block) grid
    kr = r["k"][:, :, : n * G].reshape(1, n_kv, n, G, hd).transpose(-1, -2)
    step = (kr.amax(-1, keepdim=True).clamp(min=0) - kr.amin(-1, keepdim=True).clamp(max=0)) / (2**bits_k - 1)
    assert bool(((kb - kr).abs() <= step / 2 + 1e-5).all())


def test_outputs_differ_except_first_block(ref: nn.Module) -> None:
    model, _ = compress(ref, f"kv-k2v2-g{G}")
    ids = tokens()
    a, b = logits(ref, ids), logits(model, ids)
    assert torch.isfinite(b).all()
    assert torch.allclose(a[:G], b[:G], atol=1e-5)  # the first block sees only its exact residual
    assert float((a[G:] - b[G:]).abs().max()) > 1e-2


def test_more_bits_less_error(ref: nn.Module) -> None:
    ids = tokens()
    a = logits(ref, ids)
    err = {b: float((logits(compress(ref, f"kv-k{b}v{b}-g{G}")[0], ids) - a).abs().mean()) for b in (2, 4, 8)}
    assert err[8] < err[4] < err[2]
    assert err[8] > 0


def test_reference_unaffected(tiny: nn.Module, ref: nn.Module) -> None:
    ids = tokens()
    before = logits(ref, ids)
    compress(ref, f"kv-k2v2-g{G}")
    assert ref.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, ATTR) for m in ref.modules())
    assert torch.equal(logits(ref, ids), before)
    assert torch.equal(logits(tiny, ids), before)


# ---------------------------------------------------------------- causality and decode equivalence


@pytest.mark.parametrize("method_id", [f"kv-k2v2-g{G}", "kv-k4v3-g4", "kv-k3v3-g20"])
@pytest.mark.parametrize("chunk", [512, 24])
def test_causal_prefix_passes_match(
    ref: nn.Module, method_id: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv, "QUERY_CHUNK", chunk)
    model, _ = compress(ref, method_id)
    ids = tokens()
    full = logits(model, ids)  # (T, V)
    for t in (0, 4, 7, 8, 9, 15, 16, 23, 31, 32, T - 2):
        short = logits(model, ids[:, : t + 1])
        assert float((full[t] - short[t]).abs().max()) <= 1e-5, t


@pytest.mark.parametrize("lse", [True, False], ids=["cpu-prefill", "general"])
@pytest.mark.parametrize("chunk", [512, G, 2 * G + 3])  # one call; a call per block; two blocks per call
def test_attention_equals_decode_loop(chunk: int, lse: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each query t attends to quantized blocks ended before its block plus its own block exact, with GQA,
    whether the queries go through attention in one call or in chunks of whole blocks (QUERY_CHUNK,
    PREFILL_CHUNK), on the CPU prefill route and on the general one."""
    monkeypatch.setattr(kv, "QUERY_CHUNK", chunk)
    monkeypatch.setattr(kv, "PREFILL_CHUNK", chunk)
    monkeypatch.setattr(kv, "LSE_PREFILL", lse)
    calls = []
    real = kv._prefill_cpu
    monkeypatch.setattr(kv, "_prefill_cpu", lambda *a: calls.append(1) or real(*a))
    model = build_tiny_llama()
    m = KVQuant(key_bits=3, value_bits=2, group=G)
    m.apply(model, CompressContext())
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    Tn, hq, hk, hd = 29, 4, 2, 16
    q = torch.randn(1, hq, Tn, hd, generator=g)
    k = torch.randn(1, hk, Tn, hd, generator=g) * torch.linspace(0.5, 4, hd)  # channel outliers
    v = torch.randn(1, hk, Tn, hd, generator=g)
    out, _ = _make_attention("sdpa")(attn, q, k, v, None, scaling=hd**-0.5, dropout=0.0)  # (1, T, Hq, D)

    def qdq(x: torch.Tensor, bits: int) -> torch.Tensor:  # rows of x → asymmetric min-max grid
        s, z = quant_params(x, bits, sym=False)
        return ((torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1) - z) * s).float()

    for t in range(Tn):
        b0 = (t // G) * G
        ks, vs = [], []
        for s0 in range(0, b0, G):  # finished blocks, quantized
            ks.append(qdq(k[0, :, s0 : s0 + G].transpose(-1, -2), 3).transpose(-1, -2))  # per channel
            vs.append(qdq(v[0, :, s0 : s0 + G].reshape(hk, G, hd // G, G), 2).reshape(hk, G, hd))  # per token
        ks.append(k[0, :, b0 : t + 1])
        vs.append(v[0, :, b0 : t + 1])
        K = torch.cat(ks, 1).repeat_interleave(hq // hk, 0)  # (Hq, t+1, D)
        V = torch.cat(vs, 1).repeat_interleave(hq // hk, 0)
        w = torch.softmax(torch.einsum("hd,hsd->hs", q[0, :, t], K) / math.sqrt(hd), dim=-1)
        expect = torch.einsum("hs,hsd->hd", w, V)  # (Hq, D)
        assert torch.allclose(out[0, t], expect, atol=1e-5), t
    assert len(calls) == int(lse)  # the route the test names is the one taken


@pytest.mark.parametrize("chunk", [G, 3 * G, 512])
def test_cpu_prefill_route_equals_general_route(
    ref: nn.Module, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole model's logits are the same on both routes, up to float32 rounding."""
    monkeypatch.setattr(kv, "PREFILL_CHUNK", chunk)
    model, _ = compress(ref, f"kv-k2v3-g{G}")
    ids = tokens(3 * G + 5)
    fast = logits(model, ids)
    monkeypatch.setattr(kv, "LSE_PREFILL", False)
    general = logits(model, ids)
    assert float((fast - general).abs().max()) <= 1e-5
    assert float((fast - logits(ref, ids)).abs().max()) > 1e-2  # it does quantize


@pytest.mark.parametrize("chunk", [G, 3 * G])
def test_cpu_prefill_route_in_bf16_within_bf16_rounding(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """In bfloat16 the two routes round differently (the prefill route rounds each partial output before the
    merge): one layer's outputs agree within two bf16 steps of their largest value."""
    monkeypatch.setattr(kv, "PREFILL_CHUNK", chunk)
    model = build_tiny_llama()
    KVQuant(key_bits=3, value_bits=2, group=G).apply(model, CompressContext())
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 37, 16, generator=g).to(torch.bfloat16) for h in (4, 2, 2))
    fn = _make_attention("sdpa")
    fast, _ = fn(attn, q, k, v, None, scaling=0.25, dropout=0.0)
    monkeypatch.setattr(kv, "LSE_PREFILL", False)
    general, _ = fn(attn, q, k, v, None, scaling=0.25, dropout=0.0)
    assert fast.dtype == general.dtype == torch.bfloat16
    diff = float((fast.float() - general.float()).abs().max())
    assert diff <= 2 * 2**-7 * float(general.float().abs().max())


@pytest.mark.parametrize("chunk", [512, 2 * G])
def test_eager_base_matches_sdpa(ref: nn.Module, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv, "QUERY_CHUNK", chunk)
    ids = tokens()
    sdpa_model, _ = compress(ref, f"kv-k2v3-g{G}")
    eager = copy.deepcopy(ref)
    eager.set_attn_implementation("eager")
    eager_model, ctx = compress(eager, f"kv-k2v3-g{G}")
    assert ctx.info["attn_implementation"] == "lcc_kvquant_eager"
    assert torch.allclose(logits(eager_model, ids), logits(sdpa_model, ids), atol=1e-4)
    assert not torch.allclose(logits(eager_model, ids), logits(eager, ids), atol=1e-2)


@torch.no_grad()
@pytest.mark.parametrize("chunk", [512, G])
def test_one_pass_equals_token_by_token_decoding(
    ref: nn.Module, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding with a (full-precision) HF cache re-quantized by the method gives the one-pass logits."""
    monkeypatch.setattr(kv, "QUERY_CHUNK", chunk)
    model, _ = compress(ref, f"kv-k2v2-g{G}")
    ids = tokens(3 * G + 3)
    full = logits(model, ids)  # (T, V)
    out = model(input_ids=ids[:, :5], use_cache=True)  # a short prefill, then one token at a time
    steps = [out.logits[0, -1]]
    for t in range(5, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], cache=out.past_key_values, use_cache=True)
        steps.append(out.logits[0, -1])
    assert torch.allclose(torch.stack(steps).float(), full[4:], atol=1e-4)


# ---------------------------------------------------------------- one layer type (-swa / -full)


@pytest.fixture(scope="module")
def tiny_gemma3() -> nn.Module:
    from lcc_harness.models.load import build_tiny_arch

    return build_tiny_arch("gemma3").eval()  # layer 0 sliding (window 16), layer 1 full attention


def _quantized_layers(model: nn.Module) -> list[bool]:
    return [getattr(m, ATTR) is not False for _, m in kv.attention_modules(model)]


def test_swa_and_full_quantize_one_layer_type_and_both_change_the_model(tiny_gemma3: nn.Module) -> None:
    ids = tokens(96)
    a = logits(tiny_gemma3, ids)
    out = {}
    for suffix, want in (("-swa", [True, False]), ("-full", [False, True]), ("", [True, True])):
        model, ctx = compress(tiny_gemma3, f"kv-k2v2-g{G}{suffix}")
        assert _quantized_layers(model) == want, suffix
        assert ctx.info["kv_layers"] == f"{sum(want)} of 2"
        out[suffix] = logits(model, ids)
        assert torch.allclose(out[suffix][:G], a[:G], atol=1e-5)  # the first block is exact in every layer
        assert float((out[suffix][G:] - a[G:]).abs().max()) > 1e-3, suffix
    assert not torch.allclose(out["-swa"], out["-full"])
    assert not torch.allclose(out["-swa"], out[""]) and not torch.allclose(out["-full"], out[""])


def test_a_layer_type_on_a_model_without_both_types_is_refused_in_one_line(ref: nn.Module) -> None:
    with pytest.raises(MethodError) as e:
        compress(ref, "kv-k4v4-swa")
    msg = str(e.value)
    assert "\n" not in msg and "sliding-window and full" in msg and "kv-k4v4" in msg


def test_swa_and_full_together_are_refused(tiny_gemma3: nn.Module) -> None:
    with pytest.raises(MethodError, match="drop both"):
        compress(tiny_gemma3, "kv-k4v4-swa-full")
