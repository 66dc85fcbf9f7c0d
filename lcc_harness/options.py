"""One table of options. The pytest plugin (`--lcc-<key>` and ini `lcc_<key>`) and the `lcc measure` command
(`--<key>`) are generated from it, and so is the part of `RunConfig` they share. Library errors name an option
as `--<key>`; `for_pytest` rewrites such names for plugin users.

Importing this module is cheap (no torch): the plugin reads its options at pytest_configure.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lcc_harness.errors import LengthError
from lcc_harness.profiles import PROFILES

DEFAULT_CHUNK = 256  # positions per LM-head chunk (measure.py uses the same constant)


def parse_lengths(text: str | Sequence[Any]) -> tuple[int, ...]:
    """'256,512' or a sequence → sorted tuple of positive, distinct ints; anything else is a LengthError."""
    items = [x.strip() for x in text.split(",")] if isinstance(text, str) else list(text)
    out = []
    for x in items:
        try:
            if isinstance(x, float) or (isinstance(x, str) and not x.lstrip("-").isdigit()):
                raise ValueError
            v = int(x)
        except (TypeError, ValueError):
            raise LengthError(
                f"context length '{x}' is not an integer; pass lengths like 256,512,1024"
            ) from None
        if v <= 0:
            raise LengthError(f"context length {v} must be positive; pass lengths like 256,512,1024")
        out.append(v)
    if not out:
        raise LengthError("no context lengths given; pass lengths like 256,512,1024")
    dup = sorted({v for v in out if out.count(v) > 1})
    if dup:
        raise LengthError(f"context length(s) {dup} given more than once; list each length once")
    return tuple(sorted(out))


class OptionError(ValueError):
    """A bad option value; `key` names the option, the message says what to pass instead."""

    def __init__(self, key: str, message: str) -> None:
        from lcc_harness.errors import one_line

        super().__init__(one_line(message))
        self.key = key


def _int_at_least(key: str, text: Any, least: int, example: int) -> int:
    """An integer ≥ `least`, or OptionError naming `key` (as `--<key>`) with `example` as the suggestion."""
    try:
        v = int(str(text).strip())
    except ValueError:
        raise OptionError(key, f"--{key} '{text}' is not an integer; pass e.g. --{key} {example}") from None
    if v < least:
        raise OptionError(key, f"--{key} {v} must be at least {least}; pass e.g. --{key} {example}")
    return v


def positive_int(key: str, text: Any) -> int:
    """An integer ≥ 1, or OptionError naming `key` (as `--<key>`)."""
    return _int_at_least(key, text, 1, 4)


def nonneg_int(key: str, text: Any) -> int:
    """An integer ≥ 0, or OptionError naming `key` (as `--<key>`)."""
    return _int_at_least(key, text, 0, 1)


MAX_THREADS = 1024  # llama.cpp starts one OS thread each: a typo such as 10**9 must not reach it


def thread_count(key: str, text: Any) -> int:
    """An integer in [1, MAX_THREADS], or OptionError naming `key`."""
    v = positive_int(key, text)
    if v > MAX_THREADS:
        raise OptionError(key, f"--{key} {v} is more threads than any machine has; pass e.g. --{key} 4")
    return v


MAX_SEED = 2**62  # the sample draw seeds a torch.Generator (64-bit); the mask seeds share this bound


def seed(key: str, text: Any) -> int:
    """A seed in [0, MAX_SEED], or OptionError naming `key`."""
    v = nonneg_int(key, text)
    if v > MAX_SEED:
        raise OptionError(key, f"--{key} {v} is beyond the largest seed 2**62; pass e.g. --{key} 0")
    return v


def text(key: str, value: Any) -> str:
    return str(value)


def flag(key: str, value: Any) -> bool:
    return bool(value)


PROBES = ("keytokens", "copy", "passkey", "where")  # probes.py: the long-range probes


def parse_probes(key: str, value: Any) -> tuple[str, ...]:
    """'keytokens,copy' / 'all' / 'none' → a tuple of PROBES names (in PROBES order); anything else is an
    OptionError naming `key`. A sequence of names (an already parsed value) is checked the same way."""
    text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value).strip().lower()
    if text in ("", "none", "off"):
        return ()
    if text == "all":
        return PROBES
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in PROBES]
    if bad:
        raise OptionError(
            key,
            f"--{key} '{bad[0]}' is not a probe; pass a comma-separated subset of {','.join(PROBES)}, all or none",
        )
    return tuple(p for p in PROBES if p in names)


GATED_PROBES = ("keytokens", "copy")  # the probes whose KL the gate checks against baselines
KEYTOKEN_WINDOW = 256  # probes.ProbeConfig.window: the key-token probe's short context
PROBE_MIN_LENGTH = (
    256  # copy and passkey need room for their items at the shortest length (3 questions + a span)
)


def feasible_probes(names: Sequence[str], lengths: Sequence[int]) -> tuple[str, ...]:
    """The probes of `names` that can run at `lengths` (a profile's defaults on shorter lengths): keytokens needs a
    longest length beyond its short context, copy and passkey a shortest length of PROBE_MIN_LENGTH."""
    out = []
    for n in names:
        if n == "keytokens" and max(lengths) <= KEYTOKEN_WINDOW:
            continue
        if n in ("copy", "passkey") and min(lengths) < PROBE_MIN_LENGTH:
            continue
        out.append(n)
    return tuple(out)


DESIGNS = ("window", "matched", "both")  # RunConfig.design: which curves a run measures


def design(key: str, value: Any) -> str:
    """One of DESIGNS, or OptionError naming `key`."""
    v = str(value).strip().lower()
    if v not in DESIGNS:
        raise OptionError(
            key, f"--{key} '{value}' is not one of {', '.join(DESIGNS)}; pass e.g. --{key} both"
        )
    return v


@dataclass(frozen=True)
class Option:
    """key: the name in flags ('--<key>', '--lcc-<key>', ini 'lcc_<key with _>'); field: the RunConfig field it
    sets (None: front-end only); where: 'both', 'pytest' or 'cli'; kind: 'value', 'flag' or 'append' (repeatable;
    its ini is a line list)."""

    key: str
    help: str
    field: str | None = None
    convert: Callable[[str, Any], Any] = text
    where: str = "both"
    kind: str = "value"

    @property
    def dest(self) -> str:
        return "lcc_" + self.key.replace("-", "_")

    @property
    def pytest_flag(self) -> str:
        return f"--lcc-{self.key}"


def engine(key: str, value: Any) -> str:
    """An engine name of methods.registry.ENGINES ('llamacpp' and 'llama-cpp' read as 'llama.cpp'), or OptionError
    naming `key` (light: no torch)."""
    v = str(value).strip().lower()
    aliases = {"torch": "torch", "llama.cpp": "llama.cpp", "llamacpp": "llama.cpp", "llama-cpp": "llama.cpp"}
    if v not in aliases:
        raise OptionError(
            key, f"--{key} '{value}' is not one of torch, llama.cpp; pass e.g. --{key} llama.cpp"
        )
    return aliases[v]


OPTIONS: tuple[Option, ...] = (
    Option(
        "model", "model spec: smollm2-135m, tiny-llama, a local HF folder, a .gguf, a cached hub id", "model"
    ),
    Option(
        "engine",
        "torch (default): transformers models, every method; llama.cpp: GGUF files through llama.cpp's kernels, "
        "GGUF weight types (gguf-q4_k_m) and KV-cache types (kv-q8_0) as methods",
        "engine",
        engine,
    ),
    Option("threads", "llama.cpp engine: CPU threads (default: the physical cores)", "threads", thread_count),
    Option(
        "gpu-layers",
        "llama.cpp engine: layers offloaded to the GPU (default: all with a CUDA build, else 0)",
        "gpu_layers",
        nonneg_int,
    ),
    Option(
        "imatrix",
        "llama.cpp engine: importance matrix (llama-imatrix output) for GGUF weight types",
        "imatrix",
    ),
    Option("lengths", "comma-separated context lengths", "lengths"),
    Option("samples", "evaluation spans", "samples", positive_int),
    Option("corpus", "corpus: .txt file or folder, .jsonl, or a saved dataset (default: embedded)", "corpus"),
    Option("text-field", "jsonl / dataset text field of the corpus (default: text)", "text_field"),
    Option("device", "cpu | cuda | auto (default auto)", "device"),
    Option("dtype", "float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)", "dtype"),
    Option(
        "chunk-size",
        "positions per LM-head chunk (default 256; lower it when memory is short)",
        "chunk_size",
        positive_int,
    ),
    Option(
        "design",
        "window (default): KL over positions (L/2, L] of one pass; matched: the same last T tokens of each "
        "sample scored at every length (one pass per length); both",
        "design",
        design,
    ),
    Option(
        "target-tokens",
        "matched design: target tokens T scored at every length (default: half the shortest length)",
        "target_tokens",
        positive_int,
    ),
    Option(
        "anatomy",
        "error anatomy on the first N samples at the longest length: relative error of the residual stream, keys "
        "and values per layer and log2 position bucket (0: off; default: the profile's, else 0)",
        "anatomy",
        nonneg_int,
    ),
    Option(
        "probes",
        "long-range probes beside window KL: comma-separated keytokens,copy,passkey,where, all or none "
        "(default: the profile's, else none)",
        "probes",
        parse_probes,
    ),
    Option(
        "reverse-kl",
        "also compute reverse KL(P_cmp ‖ P_ref) per length (informational, never gated; costs about a tenth of "
        "a forward per sample on the torch engine)",
        "reverse_kl",
        flag,
        kind="flag",
    ),
    Option("cache-dir", "reference cache (default $LCC_CACHE_DIR or ~/.cache/lcc-harness)", "cache_dir"),
    Option(
        "allow-extrapolation",
        "allow lengths beyond the model's maximum positions",
        "allow_extrapolation",
        flag,
        kind="flag",
    ),
    Option("profile", f"{' | '.join(PROFILES)} (default: default)", where="pytest"),
    Option(
        "methods",
        "comma-separated method ids or globs (profile and baseline ids; else registered examples)",
        where="pytest",
    ),
    Option("report-dir", "where reports are written (default: <rootdir>/reports)", where="pytest"),
    Option("baseline-dir", "where baselines live (default: <rootdir>/baselines)", where="pytest"),
    Option(
        "tolerance",
        "relative tolerance of window KL per length (default 0.02); per method: ini lcc_method_tolerance",
        where="pytest",
    ),
    Option(
        "growth-tolerance",
        "relative tolerance of growth (default 0.02); per method: ini lcc_method_growth_tolerance",
        where="pytest",
    ),
    Option(
        "update-baselines",
        "write baselines for the methods that ran (keeps the rest) instead of comparing",
        where="pytest",
        kind="flag",
    ),
    Option(
        "compressed",
        "NAME=PATH: a compressed checkpoint of the model (.gguf or HF folder) measured as method NAME; repeatable "
        "(ini lcc_compressed: one per line); without --lcc-methods only the checkpoints run",
        where="pytest",
        kind="append",
    ),
    Option(
        "shard",
        "I/N: run only the I-th of N fixed slices of the methods (1-based); `lcc merge` joins the shards' "
        "records into one report and baseline update",
        where="pytest",
    ),
    Option(
        "gpus-per-worker",
        "under pytest-xdist: K GPUs of their own for each worker (CUDA_VISIBLE_DEVICES; a model larger than "
        "one GPU is spread over its K); default: every process sees every GPU",
        where="pytest",
    ),
    Option(
        "seed",
        "seed of the sample and calibration draws (default 0)",
        "seed",
        seed,
        where="cli",
    ),
    Option("calib-samples", "calibration spans (default 8)", "calib_samples", positive_int, where="cli"),
    Option(
        "calib-length", "tokens per calibration span (default 512)", "calib_length", positive_int, where="cli"
    ),
    Option("naive", "one forward pass per length (for comparison)", "naive", flag, where="cli", kind="flag"),
)
BY_KEY = {o.key: o for o in OPTIONS}
METHOD_EPS_INI = (
    ("lcc_method_tolerance", "per-method window-KL tolerance, one 'GLOB = EPS' per line (first match wins)"),
    (
        "lcc_method_growth_tolerance",
        "per-method growth tolerance, one 'GLOB = EPS' per line (first match wins)",
    ),
)


def for_pytest(message: str) -> str:
    """A library message with option names as the plugin spells them ('--samples' → '--lcc-samples')."""
    keys = "|".join(re.escape(o.key) for o in sorted(OPTIONS, key=lambda o: -len(o.key)))
    return re.sub(rf"(?<![\w-])--({keys})(?![\w-])", r"--lcc-\1", message)


def add_pytest_options(parser: Any) -> None:
    """Every option of the plugin as `--lcc-<key>` and (values only) ini `lcc_<key>`."""
    g = parser.getgroup("lcc", "lcc-harness: long-context KL of compressed models")
    for o in OPTIONS:
        if o.where == "cli":
            continue
        if o.kind == "flag":
            g.addoption(o.pytest_flag, dest=o.dest, action="store_true", default=False, help=o.help)
        elif o.kind == "append":
            g.addoption(o.pytest_flag, dest=o.dest, action="append", default=None, help=o.help)
            parser.addini(o.dest, o.help, type="linelist", default=[])
        else:
            g.addoption(o.pytest_flag, dest=o.dest, default=None, help=o.help)
            parser.addini(o.dest, o.help, default=None)
    for dest, help_ in METHOD_EPS_INI:
        parser.addini(dest, help_, type="linelist", default=[])


def add_cli_options(parser: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    """Every option of `lcc measure` as `--<key>`, with `defaults` (key → value) shown in the help."""
    for o in OPTIONS:
        if o.where == "pytest":
            continue
        if o.kind == "flag":
            parser.add_argument(f"--{o.key}", dest=o.dest, action="store_true", help=o.help)
            continue
        default = defaults.get(o.key)

        def conv(v: str, o: Option = o) -> Any:
            try:
                return o.convert(o.key, v)
            except OptionError as exc:  # argparse reports it as a usage error naming the flag
                raise argparse.ArgumentTypeError(str(exc).split(f"--{o.key} ", 1)[-1]) from None

        metavar = o.key.split("-")[-1].upper()
        parser.add_argument(
            f"--{o.key}", dest=o.dest, type=conv, default=default, metavar=metavar, help=o.help
        )


def run_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """RunConfig keyword arguments from option key → raw value (None = not given), converted and checked."""
    out = {}
    for key, v in values.items():
        o = BY_KEY[key]
        if o.field is None or v is None:
            continue
        out[o.field] = o.convert(key, v)
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' → (I, N) with 1 ≤ I ≤ N; anything else is an OptionError naming --lcc-shard."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise OptionError("shard", f"--shard '{text}' must be I/N with 1 <= I <= N, e.g. --shard 2/4")
    return int(m[1]), int(m[2])


def shard_of(method_ids: list[str], shard: tuple[int, int]) -> list[str]:
    """The methods of shard (I, N): every N-th id of the run's list, starting at the I-th (a fixed split)."""
    i, n = shard
    return [m for k, m in enumerate(method_ids) if k % n == i - 1]


def gpu_groups(visible: list[str], workers: int, per_worker: int) -> list[list[str]]:
    """Disjoint groups of `per_worker` GPU ids, one per xdist worker; an OptionError when too few are visible."""
    need = workers * per_worker
    if len(visible) < need:
        raise OptionError(
            "gpus-per-worker",
            f"--gpus-per-worker {per_worker} with {workers} worker(s) needs {need} GPUs, {len(visible)} visible "
            f"({', '.join(visible) or 'none'}); use fewer workers (-n) or fewer GPUs per worker",
        )
    return [visible[k * per_worker : (k + 1) * per_worker] for k in range(workers)]
