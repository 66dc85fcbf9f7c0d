"""Error anatomy: relative error of the residual stream, keys and values per layer and log2 position bucket."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _tiny import TINY_LENGTHS, tiny_config

from lcc_harness.engines.results import MethodResult
from lcc_harness.engines.torch.harness import Harness
from lcc_harness.errors import HarnessError
from lcc_harness.measure.anatomy import (
    Anatomy,
    Stored,
    bucket_edges,
    bucket_index,
    bucket_sums,
    format_tables,
    relative_error,
)
from lcc_harness.measure.head import decoder_of, final_hidden
from lcc_harness.options import OptionError, run_fields

L_MAX = TINY_LENGTHS[-1]


def test_bucket_edges_and_index():
    assert bucket_edges(1) == [(0, 1)]
    assert bucket_edges(5) == [(0, 1), (1, 2), (2, 4), (4, 5)]
    assert bucket_edges(128)[-1] == (64, 128) and len(bucket_edges(128)) == 8
    idx = bucket_index(100)
    for t in range(100):
        assert int(idx[t]) == (0 if t == 0 else int(math.floor(math.log2(t))) + 1)


def test_bucket_sums_and_relative_error_against_loops():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(77, generator=g)
    sums = bucket_sums(v, bucket_index(77), len(bucket_edges(77)))
    for b, (lo, hi) in enumerate(bucket_edges(77)):
        assert float(sums[b]) == pytest.approx(sum(float(x) for x in v[lo:hi]), rel=1e-12)
    x, y = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    e = relative_error(y, x)
    for t in range(5):
        assert float(e[t]) == pytest.approx(float((y[t] - x[t]).norm() / x[t].norm()), rel=1e-6)
    assert relative_error(torch.zeros(2, 3), torch.zeros(2, 3)).tolist() == [0.0, 0.0]


def test_none_is_exactly_zero_everywhere(tiny):
    res = Harness(tiny_config(anatomy=2), lm=tiny).run("none")
    a = res.anatomy
    assert a is not None and a.samples == 2 and a.length == L_MAX and set(a.error) == {"residual", "k", "v"}
    assert a.counts == [2 * (hi - lo) for lo, hi in bucket_edges(L_MAX)]
    assert a.layers == tiny.model.config.num_hidden_layers
    assert all(v == 0.0 for rows in a.error.values() for row in rows for v in row)
    assert res.timings["anatomy_extra_passes"] == 0  # it rode on the window measurement's pass


def test_kl_is_untouched_by_the_anatomy(tiny):
    off = Harness(tiny_config(), lm=tiny).run("rtn-w3-g32")
    on = Harness(tiny_config(anatomy=2), lm=tiny).run("rtn-w3-g32")
    assert off.anatomy is None and on.anatomy is not None
    assert {L: s.to_dict() for L, s in on.stats.items()} == {L: s.to_dict() for L, s in off.stats.items()}


@pytest.mark.parametrize(
    ("include", "zero_kv_at_1"),
    [(("*layers.1.mlp.*",), {"k", "v"}), (("*layers.1.self_attn.k_proj",), {"v"})],
    ids=["layer1-mlp", "layer1-k_proj"],
)
def test_perturbing_layer_k_leaves_earlier_layers_exact(tiny, include, zero_kv_at_1):
    a = Harness(tiny_config(anatomy=1, include=include), lm=tiny).run("rtn-w3-g32").anatomy
    for q in ("residual", "k", "v"):
        assert all(v == 0.0 for v in a.error[q][0]), q  # layer 0: untouched
    assert all(v > 0 for v in a.error["residual"][1][1:])  # from layer 1 on (position 0 may round alike)
    for q in ("k", "v"):
        nonzero = any(v > 0 for v in a.error[q][1])
        assert nonzero == (q not in zero_kv_at_1), q  # K/V of layer 1 read layer 0's exact output


@torch.no_grad()
def _direct(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Residual stream after each layer (a copy of the model cut after that layer, no final norm) and each layer's
    k_proj / v_proj output on its normed input, computed without hooks."""
    out = {"residual": [], "k": [], "v": []}
    layers = decoder_of(model).layers
    x = decoder_of(model).embed_tokens(ids.view(1, -1))[0]  # (T, H): the input of layer 0
    for i, layer in enumerate(layers):
        cut = copy.deepcopy(model)
        decoder_of(cut).layers = torch.nn.ModuleList(list(decoder_of(cut).layers)[: i + 1])
        decoder_of(cut).norm = torch.nn.Identity()
        xn = layer.input_layernorm(x)
        out["k"].append(layer.self_attn.k_proj(xn))
        out["v"].append(layer.self_attn.v_proj(xn))
        x = final_hidden(cut, ids)
        out["residual"].append(x)
    return out


def test_bucket_means_equal_a_direct_computation(tiny):
    h = Harness(tiny_config(anatomy=1), lm=tiny)
    a = h.run("rtn-w3-g32").anatomy
    ids = h.samples[0].ids[:L_MAX]
    ref = _direct(tiny.model, ids)
    cmp_model, _ctx, _t = h.compress("rtn-w3-g32")
    got = _direct(cmp_model, ids)
    edges = bucket_edges(L_MAX)
    worst, worst_abs = 0.0, 0.0
    for q in ("residual", "k", "v"):
        for layer, (r, c) in enumerate(zip(ref[q], got[q], strict=True)):
            e = [float((c[t].double() - r[t].double()).norm() / r[t].double().norm()) for t in range(L_MAX)]
            for b, (lo, hi) in enumerate(edges):
                want = sum(e[lo:hi]) / (hi - lo)
                assert want > 0
                worst = max(worst, abs(a.error[q][layer][b] - want) / want)
                worst_abs = max(worst_abs, abs(a.error[q][layer][b] - want))
    # the stored reference (anatomy.Stored) rounds both sides to 2^-11 of a row's largest value: the anatomy's
    # floor of about 3e-4 in relative-error units, a small share of errors of this size (3-bit RTN)
    assert worst_abs < 3e-4 and worst < 1e-3, (worst_abs, worst)


def test_stored_rounding_is_bounded_and_keeps_zeros():
    torch.manual_seed(0)
    y = torch.randn(64, 32) * torch.logspace(-3, 3, 64).view(-1, 1)  # rows of very different size
    y[5] = 0.0
    back = Stored.pack(y).unpack()
    rel = (back - y).abs().amax(dim=-1) / y.abs().amax(dim=-1).clamp_min(1e-30)
    assert float(rel.max()) <= 2**-11 and back[5].abs().max() == 0
    assert torch.equal(Stored.pack(y).unpack(), back)  # deterministic: identical rows give identical values
    assert Stored.pack(y).q.dtype == torch.float16 and Stored.pack(y).shape == y.shape


def test_matched_only_design_takes_one_extra_forward_and_agrees(tiny):
    window = Harness(tiny_config(anatomy=1), lm=tiny).run("rtn-w3-g32")
    matched = Harness(tiny_config(anatomy=1, design="matched"), lm=tiny).run("rtn-w3-g32")
    assert matched.anatomy.to_dict() == window.anatomy.to_dict()
    assert matched.timings["anatomy_extra_passes"] == 1


def test_model_restored_and_no_hooks_left(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    h = Harness(tiny_config(anatomy=2), lm=tiny)
    h.run("rtn-w3-g32")
    h.run("magnitude-s50")
    after = tiny.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks for m in tiny.model.modules())


def test_options_and_validation(tiny):
    from lcc_harness.profiles import PROFILES

    assert {p.name: p.anatomy for p in PROFILES.values()} == {
        "smoke": 0,
        "default": 1,
        "paper": 1,
        "llamacpp": 0,
        "gemma3": 0,
        "gemma3-paper": 0,
        "long": 0,
    }
    assert run_fields({"anatomy": "1"}) == {"anatomy": 1} and run_fields({"anatomy": "0"}) == {"anatomy": 0}
    with pytest.raises(OptionError, match="--anatomy -1 must be at least 0"):
        run_fields({"anatomy": "-1"})
    with pytest.raises(HarnessError, match=r"--anatomy 3 must lie in \[0, 2\]"):
        Harness(tiny_config(anatomy=3), lm=tiny)


@pytest.fixture(scope="module")
def with_anatomy(tiny) -> MethodResult:
    return Harness(tiny_config(anatomy=1), lm=tiny).run("rtn-w3-g32")


def test_result_record_round_trip(with_anatomy):
    from lcc_harness.record import MethodOutcome, RunRecord

    d = with_anatomy.to_dict()
    assert MethodResult.from_dict(d).anatomy == with_anatomy.anatomy
    assert Anatomy.from_dict(d["anatomy"]) == with_anatomy.anatomy
    out = MethodOutcome.from_dict({"status": "ok", "anatomy": d["anatomy"]})
    back = RunRecord.from_dict(RunRecord(run={}, methods={"m": out}).to_dict())
    assert back.methods["m"].anatomy == d["anatomy"]


def test_reports_render_with_and_without_anatomy(with_anatomy, tmp_path):
    from test_report import make_record

    from lcc_harness.report import ANATOMY_PNG, render_markdown, write_reports

    rec = make_record()
    assert "Error anatomy" not in render_markdown(rec)
    rec["methods"]["rtn-w3-g128"]["anatomy"] = with_anatomy.anatomy.to_dict()
    md = render_markdown(rec)
    assert "## Error anatomy" in md and "### `rtn-w3-g128`" in md and "| layer 1" in md
    assert "K mean over layers" in md and "64–127" in md
    paths = write_reports(rec, tmp_path)
    assert paths[-1].name == ANATOMY_PNG and paths[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a record without anatomy: three files, and the previous picture is gone
    paths = write_reports(make_record(), tmp_path)
    assert len(paths) == 3 and not (tmp_path / ANATOMY_PNG).exists()
    # an anatomy with zero error everywhere (method `none`) still renders
    zero = with_anatomy.anatomy.to_dict()
    zero["error"] = {q: [[0.0] * len(r) for r in rows] for q, rows in zero["error"].items()}
    rec["methods"]["rtn-w3-g128"]["anatomy"] = zero
    assert len(write_reports(rec, tmp_path)) == 4
    assert "| layer 0" in format_tables(zero)


def test_cli_prints_the_anatomy(capsys, tmp_path):
    import json

    from lcc_harness.cli import main

    out = tmp_path / "r.json"
    args = [
        "measure",
        "--model",
        "tiny-llama",
        "--method",
        "rtn-w3-g32",
        "--lengths",
        "32,64",
        "--samples",
        "1",
    ]
    rc = main([*args, "--device", "cpu", "--quiet", "--no-cache", "--anatomy", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "residual %" in text and "anatomy reference" in text
    assert json.loads(out.read_text())["anatomy"]["length"] == 64


@pytest.mark.slow
def test_plugin_records_and_reports_the_anatomy(project):
    import json

    r = project.runpytest_subprocess(
        "-p", "no:cacheprovider", "-q", "-rfEs", "--lcc-methods", "rtn-w3-g32", "--lcc-anatomy", "1",
        "--lcc-update-baselines", "test_kl_regression.py",
    )  # fmt: skip
    r.assert_outcomes(passed=4)
    reports = project.path / "reports"
    entry = json.loads((reports / "kl_report.json").read_text())["methods"]["rtn-w3-g32"]
    assert entry["anatomy"]["samples"] == 1 and entry["anatomy"]["length"] == 256
    assert (
        "## Error anatomy" in (reports / "kl_report.md").read_text() and (reports / "kl_anatomy.png").exists()
    )
    assert "anatomy" not in (project.path / "baselines" / "tiny-llama.float32.cpu.smoke.json").read_text()


def test_gpt2_gets_the_residual_stream_and_an_unknown_body_a_note(tiny, monkeypatch):
    from test_numerics import _tiny_gpt2, loaded

    import lcc_harness.measure.anatomy as anatomy

    a = Harness(tiny_config(anatomy=1), lm=loaded(_tiny_gpt2(), "gpt2")).run("rtn-w3-g32").anatomy
    assert set(a.error) == {"residual"} and a.layers == 2 and all(v > 0 for v in a.error["residual"][1])
    assert "K / V: not captured" in format_tables(a.to_dict())

    def none(model):
        raise TypeError("LlamaForCausalLM has no list of decoder layers")

    monkeypatch.setattr(anatomy, "_decoder_layers", none)
    h = Harness(tiny_config(anatomy=1), lm=tiny)
    with pytest.warns(UserWarning, match="no error anatomy"):
        res = h.run("rtn-w3-g32")
    assert res.anatomy is None and res.stats and "no error anatomy" in " ".join(res.info["notes"])
