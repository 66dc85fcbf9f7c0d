"""The long-range probes (lcc_harness/probes.py): layout of the probe sequence, the key-token rule, scoring, and on
the embedded model: no compression reads exactly 0, a model that only loses attention beyond a distance shows it
in key-token and copy KL far more than in window KL, and the key-token set is non-empty and stable."""

from __future__ import annotations

import pytest
import torch

from lcc_harness.errors import HarnessError
from lcc_harness.measure.probe_scores import score_rows
from lcc_harness.measure.probes import (
    DEPTHS,
    ProbeConfig,
    RefAnalysis,
    build_sequence,
    check_probe_lengths,
    short_blocks,
)
from lcc_harness.options import OptionError, feasible_probes, parse_probes


class WordTokenizer:
    """A stand-in tokenizer: one token per word and one per digit (ids ≥ 2), enough to lay out a probe sequence."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out = []
        for w in text.split():
            out += [2 + int(c) for c in w] if w.isdigit() else [12 + sum(map(ord, w)) % 900]
        return out


def _seq(lengths, names=("copy", "passkey"), seed=0, span=32):
    sample = torch.arange(4000) % 997 + 1000
    filler = torch.arange(9000) % 991 + 3000
    return build_sequence(sample, filler, lengths, WordTokenizer(), names, span, seed)


@pytest.mark.parametrize("lengths", [(256, 512, 1024, 2048), (512, 2048, 8192), (300, 1000)])
def test_every_item_lies_inside_its_length_and_each_repeat_ends_at_it(lengths) -> None:
    q = _seq(lengths)
    assert q.ids.shape == (max(lengths),)
    for it in q.items:
        assert 0 <= it.start < it.end <= it.length
        assert q.ids[it.start : it.end].tolist() == it.tokens
    for L in lengths:
        rep = [it for it in q.items if it.kind == "copy" and it.length == L]
        src = [it for it in q.items if it.kind == "copy-source" and it.length == L]
        assert len(rep) == len(src) == 1 and rep[0].end == L and rep[0].tokens == src[0].tokens
        asks = [it for it in q.items if it.kind == "ask" and it.length == L]
        keys = {it.depth: it for it in q.items if it.kind == "key" and it.length == L}
        assert len(asks) == len(DEPTHS) and all(keys[a.depth].end <= a.start for a in asks)
    spans = sorted((it.start, it.end) for it in q.items)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # no two items overlap


def test_scored_rows_predict_the_planted_tokens_and_the_layout_is_deterministic() -> None:
    a, b = _seq((512, 2048)), _seq((512, 2048))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.rows, b.rows)
    assert torch.equal(a.targets, a.ids[a.rows + 1])
    for it in a.items:
        rows = a.rows[a.rows_of(it)]
        assert rows.tolist() == [it.start + k - 1 for k in it.scored]
    assert not torch.equal(_seq((512, 2048), seed=1).ids, a.ids)  # other keys under another seed


def test_a_crowded_layout_leaves_items_out_with_a_note_never_overlapping() -> None:
    q = _seq((64, 128, 256))
    assert q.notes and all("no room" in n for n in q.notes)
    spans = sorted((it.start, it.end) for it in q.items)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_short_blocks_read_each_position_with_w_to_one_and_a_half_w_tokens() -> None:
    T, W = 2000, 256
    seen = []
    for a, s, e in short_blocks(T, W):
        assert s - a == W and e - s <= W // 2
        seen += list(range(s, e))
    assert seen == list(range(W, T))


def test_key_tokens_need_both_the_margin_and_the_floor() -> None:
    long = torch.tensor([0.1, 0.1, 3.0, 0.5])  # NLL with the full context
    short = torch.tensor([2.0, 2.5, 6.0, 2.4])  # with the short one: gains 1.9, 2.4, 3.0, 1.9 nats
    mask = RefAnalysis(long, short, torch.zeros(5)).key_mask(ProbeConfig())
    assert mask.tolist() == [False, True, False, False]  # 3.0: log p = −3 below the floor


def test_identical_logits_score_zero_kl_and_equal_accuracy() -> None:
    z = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, 50, (7,), generator=torch.Generator().manual_seed(1))
    r = score_rows(z, z.clone(), t)
    assert (
        torch.equal(r.kl, torch.zeros(7))
        and torch.equal(r.ref_ok, r.cmp_ok)
        and torch.equal(r.ref_lp, r.cmp_lp)
    )


def test_probe_options_are_checked_in_one_line() -> None:
    assert parse_probes("probes", "all") == ("keytokens", "copy", "passkey", "where")
    assert parse_probes("probes", "copy, keytokens") == ("keytokens", "copy")
    assert parse_probes("probes", "none") == ()
    with pytest.raises(OptionError, match="'passkeys' is not a probe"):
        parse_probes("probes", "copy,passkeys")
    assert feasible_probes(("keytokens", "copy"), (256, 512)) == ("keytokens", "copy")
    assert feasible_probes(("keytokens", "copy"), (64, 128, 256)) == ()  # the smoke profile's lengths
    assert feasible_probes(("keytokens", "copy"), (32, 512)) == ("keytokens",)
    with pytest.raises(HarnessError, match="at least 256 tokens"):
        check_probe_lengths(ProbeConfig(("copy",)), (128, 512))
    with pytest.raises(HarnessError, match="shorter than the longest length 256"):
        check_probe_lengths(ProbeConfig(("keytokens",)), (128, 256))


# ---- on the embedded model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    from lcc_harness.engines.results import RunConfig
    from lcc_harness.engines.torch.harness import Harness

    probes = parse_probes("probes", "all")
    return Harness(
        RunConfig(model="smollm2-135m", lengths=(512, 1024), samples=2, device="cpu", probes=probes)
    )


def _cells(probes: dict):
    yield from probes["curves"].items()


@pytest.mark.slow  # a long run (about a minute on 2 cores)
def test_no_compression_reads_exactly_zero_on_every_probe(smol) -> None:
    p = smol.run("none").probes
    assert set(p["curves"]) == {"512", "1024"}
    defined = 0
    for _, c in _cells(p):
        k = c["keytokens"]
        assert k["rest_kl"] == 0.0 and (k["kl"] is None or k["kl"] == 0.0)
        assert c["where"]["flip"] == 0.0 and c["where"]["by_position"] == [0.0] * 4
        cp = c["copy"]
        assert (
            cp["kl"] == 0.0 and cp["cmp_acc"] == cp["ref_acc"] > 0.5
        )  # SmolLM2 copies: the probe is defined
        for cell in c["passkey"].values():
            assert cell["kl"] is None or (cell["kl"] == 0.0 and cell["cmp_em"] == cell["ref_em"])
        defined += k["kl"] is not None
    assert defined >= 1  # key tokens exist at 1024


def _sliding(model: torch.nn.Module, window: int) -> torch.nn.Module:
    """The same weights as a Mistral whose attention sees only the last `window` tokens: a 'compressed' model that
    changes nothing but attention beyond that distance."""
    from transformers import MistralConfig, MistralForCausalLM

    d = model.config.to_dict()
    for k in ("architectures", "model_type", "transformers_version", "auto_map"):
        d.pop(k, None)
    m = MistralForCausalLM(MistralConfig(**{**d, "sliding_window": window})).eval()
    missing, unexpected = m.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    m.tie_weights()
    return m


def test_attention_lost_beyond_a_distance_shows_in_key_token_and_copy_kl_not_window_kl(smol) -> None:
    res = smol.run_checkpoint(_sliding(smol.lm.model, 128), "sliding-128")
    win = res.stats[1024].window_kl
    c = res.probes["curves"]["1024"]
    assert c["copy"]["kl"] > 4 * win, (c["copy"], win)  # the repeat is ~500 tokens past what it can see
    assert c["copy"]["cmp_acc"] < c["copy"]["ref_acc"] - 0.3
    # it also loses the first tokens (attention sinks), which moves every position: key tokens still lose more
    assert c["keytokens"]["kl"] > 2 * c["keytokens"]["rest_kl"], c["keytokens"]


@pytest.mark.slow  # a long run (about a minute on 2 cores)
def test_key_token_set_at_2048_is_non_empty_and_the_same_on_a_rerun(smol) -> None:
    from lcc_harness.measure.head import final_hidden
    from lcc_harness.measure.probes import analyse_reference

    model, head = smol.lm.model, smol.reference.head
    ids = torch.cat([s.ids for s in smol.tokens.draw(1, 2048, 7)])

    def once() -> torch.Tensor:
        h = final_hidden(model, ids)
        a = analyse_reference(
            ids,
            256,
            lambda: ((s, head(h[s : s + 256])) for s in range(0, 2048, 256)),
            lambda x, k: head(final_hidden(model, x)[-k:]),
        )
        return a.key_mask(ProbeConfig())

    m1, m2 = once(), once()
    assert int(m1.sum()) > 0 and torch.equal(m1, m2)


def test_probe_cache_round_trips_and_a_damaged_or_foreign_entry_is_recomputed(tmp_path) -> None:
    from lcc_harness.measure.probes import ProbeReference, load_reference, save_reference

    a = RefAnalysis(torch.rand(9), torch.rand(9), torch.rand(10))
    pr = ProbeReference([a], None, [torch.rand(4, 3)], 1.0)
    path = tmp_path / "probes-x.safetensors"
    save_reference(path, "k1", pr)
    got = load_reference(path, "k1", None, None)
    assert torch.equal(got.analyses[0].nll_short, a.nll_short) and torch.equal(
        got.rows_hidden[0], pr.rows_hidden[0]
    )
    assert load_reference(path, "k2", None, None) is None  # another key: recomputed, never used
    path.write_bytes(
        path.read_bytes()[:40]
    )  # truncated (a run killed mid-write cannot leave this: atomic_write)
    assert load_reference(path, "k1", None, None) is None
    assert load_reference(tmp_path / "missing.safetensors", "k1", None, None) is None


def test_the_probe_sequence_does_not_depend_on_which_probes_are_scored() -> None:
    from types import SimpleNamespace

    from lcc_harness.measure.probes import probe_sequences

    samples = [
        SimpleNamespace(ids=torch.arange(3000) % 997 + 1000),
        SimpleNamespace(ids=torch.arange(3000) % 991),
    ]
    seqs = [
        probe_sequences(samples, (256, 1024), WordTokenizer(), ProbeConfig(names), 0)
        for names in (("copy",), ("passkey",), ("keytokens", "copy", "passkey", "where"))
    ]
    for a, b in zip(seqs, seqs[1:], strict=False):
        assert all(
            torch.equal(x.ids, y.ids) and torch.equal(x.rows, y.rows) for x, y in zip(a, b, strict=True)
        )
