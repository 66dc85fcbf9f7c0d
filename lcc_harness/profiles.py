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
    # (role, method id) pairs that replace the paper's default for this model — strengths chosen for comparable
    # damage on a small model — or add roles only some models have (kv_swa / kv_full: KV-cache noise in the
    # sliding-window layers only / in the full-attention layers only, for the sliding-window claim)
    role_overrides: tuple[tuple[str, str], ...] = ()

    @property
    def roles(self) -> dict[str, str | tuple[str, ...]]:
        """Role in the findings → method id (random10: one id per mask seed, findings.role_ids)."""
        g = self.group
        base: dict[str, str | tuple[str, ...]] = {
            "magnitude": "magnitude-s50",
            "wanda": "wanda-s50",
            "rtn3": f"rtn-w3-g{g}",
            "rtn4": f"rtn-w4-g{g}",
            "mixed3": f"mixed-w3-g{g}-p2",
            "mixed3_random": f"mixed-random-w3-g{g}-p2",
            "random10": tuple(f"random-s10-seed{k}" for k in range(self.mask_seeds)),
        }
        for role, mid in self.role_overrides:
            if role == "random10":  # one id stem, one id per mask seed
                base[role] = tuple(f"{mid}-seed{k}" for k in range(self.mask_seeds))
            else:
                base[role] = mid
        return base

    @property
    def methods(self) -> tuple[str, ...]:
        if self.method_ids:
            return self.method_ids
        r = self.roles
        paper = (
            r["magnitude"],
            r["wanda"],
            *r["random10"],
            r["rtn4"],
            r["rtn3"],
            r["mixed3"],
            r["mixed3_random"],
        )
        extra = [v for k, v in r.items() if k in EXTRA_ROLES and isinstance(v, str)]
        return tuple(dict.fromkeys((*paper, *extra)))


# roles beyond the paper's that a profile may add (role_overrides), read by claims of their own
EXTRA_ROLES = ("kv_swa", "kv_full")


# Gemma 3 270M at comparable damage: the paper's 7B strengths destroy a 270M model (magnitude-s50: window KL 5.0 nats
# at 512 tokens, random-s10 4.2), so each pruning role takes the strength whose KL at 512 tokens is nearest 3-bit
# RTN's (rtn-w3-g64: 2.9), measured with `lcc measure --model gemma3-270m --lengths 512,2048 --samples 2 --method …`
# (docs/findings.md); the KV roles quantize 2-bit caches in one layer type only.
GEMMA3_ROLES: tuple[tuple[str, str], ...] = (
    ("magnitude", "magnitude-s35"),
    ("wanda", "wanda-s70"),
    ("random10", "random-s5"),
    ("kv_swa", "kv-k2v2-swa"),
    ("kv_full", "kv-k2v2-full"),
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
            probes=("keytokens", "copy", "passkey", "where"),
            description="SmolLM2-135M to its full 8192-token context (slow; GPU runner recommended)",
        ),
        Profile(
            "gemma3",
            "gemma3-270m",
            (512, 1024, 2048),
            8,
            group=64,
            mask_seeds=3,
            slow=True,
            role_overrides=GEMMA3_ROLES,
            description="Gemma 3 270M (sliding window 512, 262k vocabulary), the paper's methods at strengths of "
            "comparable damage, 512…2048 tokens: about an hour on 2 CPU cores",
        ),
        Profile(
            "gemma3-paper",
            "gemma3-270m",
            (512, 1024, 2048, 4096, 8192),
            16,
            group=64,
            slow=True,
            role_overrides=GEMMA3_ROLES,
            description="Gemma 3 270M to 8192 tokens, 16 samples (slow; GPU runner recommended)",
        ),
        Profile(
            "long",
            "gemma3-270m",
            (512, 2048, 8192, 32768),
            4,
            group=64,
            design="window",
            slow=True,
            method_ids=("rtn-w4-g64", "magnitude-s20", "kv-k2v2", "kv-k2v2-swa", "kv-k2v2-full"),
            description="Gemma 3 270M to its full 32,768-token context, window KL (outside CI; a GPU or hours)",
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
