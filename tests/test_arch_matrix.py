"""The architectures users run, as tiny random models built in code (models.TINY_ARCHS): Qwen2 (qkv biases), Qwen3
(q/k norms), Gemma 3 (sliding + global layers, GeGLU, tied embeddings, soft-capped logits), Mistral (sliding window),
Phi-3 (fused qkv_proj, gate_up_proj) and GPT-2 (Conv1D).

On each: every torch method family either changes the model (window KL > 0 at some length) or refuses in one line
(a MethodError saying why) — never a crash inside the method (MethodRunError), never a silent no-op; and the one-pass
curve equals naive per-length passes (outputs do not depend on the total length), for the reference and a
compressed model."""

from __future__ import annotations

import math

import pytest

from lcc_harness.engines.results import RunConfig
from lcc_harness.engines.torch.harness import Harness
from lcc_harness.errors import MethodError, MethodRunError
from lcc_harness.methods.registry import families
from lcc_harness.models.load import TINY_ARCHS, load_model

LENGTHS = (96, 192)  # beyond the tiny sliding windows (16) and the KV methods' exact newest block (64)
ARCHS = list(TINY_ARCHS)


def _methods() -> list[str]:
    """One id per torch family: its first example (the ones that need a library only when it is installed)."""
    out = []
    for name, cls in sorted(families().items()):
        if "torch" not in cls.engines or name == "none":
            continue
        out.append(cls.examples[0])
    return out


@pytest.fixture(scope="module", params=ARCHS)
def arch_harness(request):
    lm = load_model(f"tiny-{request.param}", "cpu")
    cfg = RunConfig(
        model=f"tiny-{request.param}",
        lengths=LENGTHS,
        samples=1,
        device="cpu",
        use_cache=False,
        calib_samples=2,
        calib_length=64,
    )
    return Harness(cfg, lm=lm)


@pytest.mark.slow  # a long run (about a minute on 2 cores)
def test_every_method_family_changes_the_model_or_refuses_in_one_line(arch_harness) -> None:
    refused = every_family_changes_or_refuses(arch_harness)
    print(arch_harness.cfg.model, "refused:", refused)  # which ones refuse is part of the record


def every_family_changes_or_refuses(h: Harness) -> dict[str, str]:
    """Run one id per torch family on `h`; fail unless each changes the model (finite window KL > 0 at some
    length) or refuses with a one-line MethodError. Returns the refusals (id → message)."""
    problems, refused = [], {}
    for mid in _methods():
        try:
            res = h.run(mid)
        except MethodRunError as exc:  # the method crashed: a bug to fix, not a refusal
            problems.append(f"{mid}: {exc}")
            continue
        except MethodError as exc:
            msg = str(exc)
            assert "\n" not in msg and msg, (mid, msg)
            refused[mid] = msg
            continue
        kl = [s.window_kl for s in res.stats.values()]
        if not (all(math.isfinite(k) for k in kl) and max(kl) > 0):
            problems.append(f"{mid}: window KL {kl} — the method matched nothing on {h.cfg.model}")
    assert not problems, "\n".join(problems)
    return refused


def test_one_pass_equals_naive_per_length_passes(arch_harness) -> None:
    h = arch_harness
    naive = Harness(RunConfig(**{**h.cfg.__dict__, "naive": True}), lm=h.lm)
    for mid in ("none", "rtn-w4-g128"):
        a, b = h.run(mid), naive.run(mid)
        assert a.mode == "one-pass", (h.cfg.model, a.info.get("notes"))
        for L in LENGTHS:
            x, y = a.stats[L].window_kl, b.stats[L].window_kl
            assert abs(x - y) <= 1e-5 * max(abs(y), 1e-6) + 1e-7, (h.cfg.model, mid, L, x, y)
