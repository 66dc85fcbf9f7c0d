"""Compressing in place (snapshot.Snapshot + Harness.compressed): the same KL as compressing a deep copy, and the
reference model put back exactly, also after methods that raise."""

from __future__ import annotations

import copy

import pytest
import torch
from _faulty import register_all, unregister_all
from _tiny import tiny_config

from lcc_harness.engines.torch.harness import Harness
from lcc_harness.errors import HarnessError
from lcc_harness.methods import families
from lcc_harness.methods.registry import CompressContext, Method, register, unregister
from lcc_harness.models.snapshot import Snapshot

# one id per built-in family that applies to the tiny model (width 64: groups of 32)
METHODS = [
    "none",
    "rtn-w3-g32",
    "gptq-w3-g32",
    "magnitude-s50",
    "wanda-s50",
    "random-s10",
    "mixed-w3-g32-p2",
    "mixed-random-w3-g32-p2",
    "mixed-saliency-w3-g32-p2",
    "w8a8",
    "smoothquant-w8a8-a0.5",
    "kv-k2v2-g32",
    "gguf-q4_0",
]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pair(tiny):
    """Two harnesses on the tiny model: compressing in place, and compressing a deep copy."""
    inplace = Harness(tiny_config(), lm=copy.deepcopy(tiny))
    copied = Harness(tiny_config(in_place=False), lm=copy.deepcopy(tiny))
    return inplace, copied


def test_every_builtin_family_is_covered():
    """(The adapters to quantization libraries, `Method.library`, are covered by tests/methods/test_adapters.py.)"""
    builtin = {f for f, cls in families().items() if cls.library is None and f != "act-quant"}
    assert {m.split("-")[0] for m in METHODS} >= {f.split("-")[0] for f in builtin}


@pytest.mark.parametrize("method", METHODS)
def test_in_place_gives_the_deep_copy_kl_and_puts_the_model_back(pair, method):
    inplace, copied = pair
    before = _state(inplace.lm.model)
    a, b = inplace.run(method), copied.run(method)
    for L in inplace.lengths:
        assert a.stats[L].per_sample == b.stats[L].per_sample, (method, L)
    after = _state(inplace.lm.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert inplace.lm.model.config._attn_implementation == copied.lm.model.config._attn_implementation


@pytest.fixture()
def faulty():
    register_all()
    yield
    unregister_all()


@pytest.mark.parametrize("method", ["fault-raise", "fault-nan", "fault-inf-logits", "fault-oom-16"])
def test_a_method_that_raises_leaves_the_reference_untouched(pair, faulty, method):
    inplace, _ = pair
    before = _state(inplace.lm.model)
    hooks = inplace.lm.model.get_output_embeddings()._forward_hooks.copy()
    with pytest.raises(HarnessError):
        inplace.run(method)
    after = _state(inplace.lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert inplace.lm.model.get_output_embeddings()._forward_hooks == hooks
    assert inplace.run("rtn-w3-g32").stats == pair[1].run("rtn-w3-g32").stats


class _HeadToo(Method):
    """Quantizes the LM head too (tied to the embeddings on many models), writing through `.data`."""

    family = "test-headtoo"
    forms = ("test-headtoo",)

    @torch.no_grad()
    def apply(self, model, ctx: CompressContext):
        head = model.get_output_embeddings()
        head.weight.data.mul_(0.9)  # `.data`: no version counter sees this
        old = model.model.layers[0].mlp.down_proj
        new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
        new.weight.copy_(old.weight * 0.5)
        model.model.layers[0].mlp.down_proj = new  # a replaced child
        model.model.norm.register_forward_hook(lambda m, a, out: out * 1.01)
        model.model.layers[1].extra_attribute = "set by the method"
        return model


def test_head_changed_in_place_is_measured_against_the_original_head(pair):
    import dataclasses

    cls = dataclasses.dataclass(frozen=True)(_HeadToo)
    register(cls)
    try:
        inplace, copied = pair
        layers = inplace.lm.model.model.layers
        original = layers[0].mlp.down_proj  # the method replaces this child; the snapshot must put it back
        a, b = inplace.run("test-headtoo"), copied.run("test-headtoo")
        assert all(a.stats[L].per_sample == b.stats[L].per_sample for L in inplace.lengths)
        assert a.stats[inplace.lengths[0]].window_kl > 0.001
        assert layers[0].mlp.down_proj is original
        assert torch.equal(
            layers[0].mlp.down_proj.weight, copied.lm.model.model.layers[0].mlp.down_proj.weight
        )
        assert not hasattr(layers[1], "extra_attribute") and not inplace.lm.model.model.norm._forward_hooks
    finally:
        unregister("test-headtoo")


def test_snapshot_keeps_tied_tensors_once(tiny):
    model = copy.deepcopy(tiny.model)
    params = {id(p) for p in model.parameters()}  # parameters() lists a tied tensor once
    snap = Snapshot(model)
    n = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    assert snap.nbytes == n and len(params) == len(list(model.parameters()))
