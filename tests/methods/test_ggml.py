"""gguf-q{b}_{v}: parity with gguf-py's quantize → dequantize, bits per weight, ids, widths that are not blocks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from torch import nn

from lcc_harness.errors import MethodError
from lcc_harness.methods.ggml import GGML_TYPES, GGUFQuant
from lcc_harness.methods.registry import CompressContext, parse_method

IDS = {f"gguf-q{b}_{v}": name for (b, v), name in GGML_TYPES.items()}
BITS = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5}


def gguf_round_trip(w: torch.Tensor, name: str) -> torch.Tensor:
    """The independent side of the parity: gguf-py on the float32 numpy copy of w (O, I)."""
    qtype = GGMLQuantizationType[name]
    x = w.detach().float().numpy()
    return torch.from_numpy(np.asarray(quants.dequantize(quants.quantize(x, qtype), qtype)).reshape(x.shape))


def linear(out_f: int = 24, in_f: int = 96, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        lin.weight[0, :32] = 0.0  # an all-zero block (scale 0)
        lin.weight[1, 5] = 1.5  # an outlier block
    return lin


@pytest.mark.parametrize("method_id", IDS, ids=list(IDS))
def test_transform_is_gguf_dequantize_of_quantize(method_id):
    m = parse_method(method_id)
    lin = linear()
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        bits = m.transform("layers.0", lin, CompressContext(), None)
    want = gguf_round_trip(w0, IDS[method_id])
    assert torch.equal(lin.weight.detach(), want)
    assert not torch.equal(lin.weight.detach(), w0)
    assert bits == BITS[IDS[method_id]]


@pytest.mark.parametrize("method_id", ["gguf-q4_0", "gguf-q8_0"])
def test_bf16_weights_go_through_float32(method_id):
    lin = linear().to(torch.bfloat16)
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        parse_method(method_id).transform("layers.0", lin, CompressContext(), None)
    assert lin.weight.dtype == torch.bfloat16
    assert torch.equal(lin.weight.detach(), gguf_round_trip(w0.float(), IDS[method_id]).to(torch.bfloat16))


@pytest.mark.parametrize("method_id", IDS, ids=list(IDS))
def test_every_target_of_the_tiny_model_and_its_bits(method_id, tiny):
    ctx = CompressContext()
    before = {n: lin.weight.detach().clone() for n, lin in ctx.linears(copy.deepcopy(tiny))}
    out = parse_method(method_id).apply(copy.deepcopy(tiny), ctx)
    for n, lin in ctx.linears(out):
        assert torch.equal(lin.weight.detach(), gguf_round_trip(before[n], IDS[method_id])), n
    assert ctx.info["effective_bits"] == BITS[IDS[method_id]]
    assert torch.equal(out.lm_head.weight, tiny.lm_head.weight)  # the head is not a target


def test_a_second_round_trip_changes_nothing():
    """Why gguf-q4_1 on a model stored as Q4_1 (SmolLM2) is lossless: each type is idempotent here."""
    w = linear().weight.detach()
    for name in GGML_TYPES.values():
        once = gguf_round_trip(w, name)
        assert torch.equal(gguf_round_trip(once, name), once), name


def test_a_width_that_is_not_a_multiple_of_32_is_refused():
    lin = linear(in_f=48)
    with pytest.raises(
        MethodError,
        match=r"method 'gguf-q4_0': the input width 48 of layers\.0 is not a multiple of the Q4_0 block size 32",
    ):
        parse_method("gguf-q4_0").transform("layers.0", lin, CompressContext(), None)


@pytest.mark.parametrize(
    "bad,match",
    [
        (
            "gguf-q6_0",
            r"GGUF has no legacy type Q6_0; use one of gguf-q4_0, gguf-q4_1, gguf-q5_0, gguf-q5_1, gguf-q8_0",
        ),
        ("gguf-q8_1", r"GGUF has no legacy type Q8_1"),
        ("gguf-q3_0", r"bits=3 is out of range \[4, 8\]"),
        ("gguf-q4_2", r"variant=2 is out of range \[0, 1\]"),
    ],
)
def test_ids_of_types_gguf_does_not_have(bad, match):
    with pytest.raises(MethodError, match=match):
        parse_method(bad)


def test_ids_read_like_llama_cpp_names():
    assert [GGUFQuant(b, v).id for b, v in GGML_TYPES] == list(IDS)
    assert [GGUFQuant(b, v).type_name for b, v in GGML_TYPES] == list(IDS.values())
