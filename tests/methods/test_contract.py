"""One contract for every registered method family (built-ins and plugins), and the ≤ 10-line method of
docs/methods.md (*Your own quantizer*)."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from lcc_harness.errors import MethodError
from lcc_harness.methods import CompressContext, families, parse_method
from lcc_harness.methods.registry import unregister
from lcc_harness.models.load import plain_values

METHODS_DOC = Path(__file__).resolve().parents[2] / "docs" / "methods.md"
EXAMPLES = [(fam, ex) for fam, cls in families().items() for ex in cls.examples]
# the torch engine's contract: every example of a family it runs changes the tiny model (or is `none`)
TORCH_EXAMPLES = [(fam, ex) for fam, ex in EXAMPLES if "torch" in families()[fam].engines]
LLAMA_ONLY = [(fam, ex) for fam, ex in EXAMPLES if "torch" not in families()[fam].engines]


def test_every_family_has_examples_forms_and_a_description():
    for fam, cls in families().items():
        assert cls.examples and cls.forms and cls.description, fam


@pytest.mark.parametrize("family,example", EXAMPLES, ids=[e for _, e in EXAMPLES])
def test_example_ids_round_trip(family, example):
    m = parse_method(example)
    assert m.family == family and m.id == example and parse_method(m.id) == m
    assert type(m).pattern.fullmatch(example)


def _on_tiny(m, tiny_model):
    """`m` applied to a copy of the tiny model (group sizes that do not divide its width 64 become 32)."""
    if "group" in {f.name for f in dataclasses.fields(m)} and m.group not in (0, 32) and m.family != "kv":
        m = dataclasses.replace(m, group=32)
    dev = tiny_model.get_input_embeddings().weight.device
    calib = tuple(torch.arange(96, device=dev) * 7 % 256 for _ in range(2)) if m.needs_calibration else ()
    return m.apply(copy.deepcopy(tiny_model), CompressContext(calibration=calib, seed=0))


@pytest.mark.parametrize("family,example", LLAMA_ONLY, ids=[e for _, e in LLAMA_ONLY])
def test_llama_cpp_only_methods_refuse_torch_in_one_line(family, example, tiny):
    m = parse_method(example)
    assert "llama.cpp" in m.engines and m.engine_spec() is not None
    with pytest.raises(MethodError, match=r"llama\.cpp engine only.*--engine llama\.cpp") as exc:
        m.apply(copy.deepcopy(tiny), CompressContext())
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("family,example", TORCH_EXAMPLES, ids=[e for _, e in TORCH_EXAMPLES])
def test_every_example_applies_to_the_tiny_model(family, example, tiny, device):
    m = parse_method(example)
    ref = copy.deepcopy(tiny).to(device)
    out = _on_tiny(m, ref)
    ids = (torch.arange(160, device=device) * 5 % 256).view(1, -1)  # longer than a KV block (64)
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, out(input_ids=ids).logits
    assert torch.isfinite(b).all()
    assert torch.equal(a, b) == (family == "none")


@pytest.mark.parametrize("family,example", TORCH_EXAMPLES, ids=[e for _, e in TORCH_EXAMPLES])
def test_every_weight_changing_example_records_outliers(family, example, tiny):
    """A method that rewrites target weights records the outlier weights it changed (outliers.py); one that
    changes none (`none`, KV-cache quantization) records nothing."""
    m = parse_method(example)
    if "group" in {f.name for f in dataclasses.fields(m)} and m.group not in (0, 32) and m.family != "kv":
        m = dataclasses.replace(m, group=32)
    calib = tuple(torch.arange(96) * 7 % 256 for _ in range(2)) if m.needs_calibration else ()
    ctx = CompressContext(calibration=calib, seed=0)
    out = m.apply(copy.deepcopy(tiny), ctx)
    before = dict(CompressContext().linears(tiny))
    changed = any(
        not torch.equal(plain_values(lin.weight), before[n].weight)
        for n, lin in CompressContext().linears(out)
    )
    assert ("outliers" in ctx.info) == changed == (family not in ("none", "kv")), ctx.info.keys()
    assert ("super_weights_zeroed" in ctx.info) == changed


def _doc_block() -> str:
    text = METHODS_DOC.read_text()
    start = text.index("## Your own quantizer")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_documented_method_is_ten_lines_and_runs(tiny):
    block = _doc_block()
    body = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith(("from ", "import "))]
    assert len(body) <= 10, body
    ns = {
        "my_fake_quant": lambda w, bits: (
            (w / (s := w.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)))
            .round()
            .clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            * s
        )
    }
    try:
        exec(compile(block, "docs/methods.md", "exec"), ns)
        m = parse_method("myquant-w4")
        assert m.id == "myquant-w4" and type(m).__name__ == "MyQuant"
        ctx = CompressContext()
        model = m.apply(copy.deepcopy(tiny), ctx)
        assert ctx.info["effective_bits"] == pytest.approx(4 + 16 / 64, rel=0.3)
        w0 = tiny.model.layers[0].mlp.up_proj.weight
        w1 = model.model.layers[0].mlp.up_proj.weight
        assert (
            not torch.equal(w0, w1)
            and (w1 / w1.abs().amax(1, keepdim=True) * 7)
            .sub((w1 / w1.abs().amax(1, keepdim=True) * 7).round())
            .abs()
            .max()
            < 1e-4
        )
        with pytest.raises(
            MethodError, match=r"bits=9 is out of range \[2, 8\]; write it as myquant-w\{2..8\}"
        ):
            parse_method("myquant-w9")
    finally:
        unregister("myquant")
