"""Named run profiles: which model, lengths, samples and methods `pytest suites/` runs."""

from __future__ import annotations

from dataclasses import dataclass

from lcc_harness.errors import HarnessError


@dataclass(frozen=True)
class Profile:
    """A run spec plus the method ids that play each role in the paper's findings."""

    name: str
    model: str
    lengths: tuple[int, ...]
    samples: int
    group: int  # quantizer group size: must divide every target input width (SmolLM2: 576 and 1536 → 64)
    calib_samples: int = 8
    calib_length: int = 512
    slow: bool = False
    anatomy: int = 0  # error-anatomy samples (RunConfig.anatomy); --lcc-anatomy overrides it
    # which curves the run measures (RunConfig.design): the claims read the matched-target curves, the gate the
    # window curves, so the profiles measure both; --lcc-design overrides it
    design: str = "both"
    # random pruning runs with this many mask seeds (random-s10-seed0 …); its claim pools them
    mask_seeds: int = 5
    description: str = ""
    # which engine runs it (RunConfig.engine; --lcc-engine overrides it), and for a profile that plays no roles
    # in the paper's findings, its own method ids
    engine: str = "torch"
    method_ids: tuple[str, ...] = ()
    # long-range probes (probes.py) measured and gated beside window KL; --lcc-probes overrides them
    probes: tuple[str, ...] = ()

    @property
    def roles(self) -> dict[str, str | tuple[str, ...]]:
        """Role in the findings → method id (random10: one id per mask seed, findings.role_ids)."""
        g = self.group
        return {
            "magnitude": "magnitude-s50",
            "wanda": "wanda-s50",
            "rtn3": f"rtn-w3-g{g}",
            "rtn4": f"rtn-w4-g{g}",
            "mixed3": f"mixed-w3-g{g}-p2",
            "mixed3_random": f"mixed-random-w3-g{g}-p2",
            "random10": tuple(f"random-s10-seed{k}" for k in range(self.mask_seeds)),
        }

    @property
    def methods(self) -> tuple[str, ...]:
        if self.method_ids:
            return self.method_ids
        r = self.roles
        return (
            r["magnitude"],
            r["wanda"],
            *r["random10"],
            r["rtn4"],
            r["rtn3"],
            r["mixed3"],
            r["mixed3_random"],
        )


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "smoke",
            "tiny-llama",
            (64, 128, 256),
            3,
            group=32,
            calib_samples=4,
            calib_length=128,
            description="tiny random Llama, lengths ≤ 256: seconds; exercises the harness itself",
        ),
        Profile(
            "default",
            "smollm2-135m",
            (256, 512, 1024, 2048),
            8,
            group=64,
            anatomy=1,
            probes=("keytokens", "copy", "passkey", "where"),
            description="SmolLM2-135M, the paper's methods, 256…2048 tokens: minutes on 2 CPU cores",
        ),
        Profile(
            "paper",
            "smollm2-135m",
            (256, 512, 1024, 2048, 4096, 8192),
            16,
            group=64,
            anatomy=1,
            slow=True,
            description="SmolLM2-135M to its full 8192-token context (slow; GPU runner recommended)",
        ),
        Profile(
            "llamacpp",
            "smollm2-135m",
            (256, 512, 1024),
            4,
            group=64,
            design="window",
            engine="llama.cpp",
            method_ids=("kv-q8_0", "kv-q4_0", "gguf-q8_0", "gguf-q4_0", "gguf-q4_k_m", "gguf-q2_k"),
            probes=("keytokens", "copy", "passkey", "where"),
            description="SmolLM2-135M through llama.cpp's kernels: KV-cache and GGUF weight types, 256…1024 tokens",
        ),
    )
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise HarnessError(f"unknown profile '{name}'; use one of {', '.join(PROFILES)}") from None
