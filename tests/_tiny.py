"""A RunConfig on the tiny random model, shared by the tests that build harnesses on it."""

from __future__ import annotations

from lcc_harness.engines.results import RunConfig

TINY_LENGTHS = (32, 64, 128)


def tiny_config(**kw) -> RunConfig:
    """Lengths TINY_LENGTHS, 2 samples, CPU, no reference cache; `kw` overrides."""
    base = dict(model="tiny-llama", lengths=TINY_LENGTHS, samples=2, device="cpu", use_cache=False)
    return RunConfig(**{**base, **kw})
