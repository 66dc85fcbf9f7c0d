"""What a method is: the Method / WeightMethod base classes (family, forms, examples, parameters, engines,
libraries), the CompressContext a method receives, seeded generators, and the parsing of a method id's form."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from decimal import Decimal
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import Any, ClassVar

import torch
from torch import nn

from lcc_harness.errors import MethodError
from lcc_harness.methods._outliers import OutlierWatch
from lcc_harness.methods._targets import DEFAULT_INCLUDE, iter_linears, linearize_conv1d
from lcc_harness.options import MAX_SEED


@dataclass(frozen=True)
class CompressContext:
    """What a method may use besides the model: calibration token spans and target selection.

    calibration: tuples of int64 token-id tensors of shape (T,), disjoint from the evaluation spans.
    """

    calibration: tuple[torch.Tensor, ...] = ()
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    seed: int = 0
    info: dict = field(default_factory=dict, compare=False)  # methods may record facts for reports

    def linears(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        """The target Linears of `model` (see targets.iter_linears; GPT-2 `Conv1D`s are turned into Linears
        first). None found is a MethodError: a weight method would otherwise be a silent no-op."""
        linearize_conv1d(model)
        found = list(iter_linears(model, self.include, self.exclude))
        if not found:
            raise MethodError(
                f"no target layers in {type(model).__name__}: no nn.Linear (or Conv1D) matches include "
                f"{list(self.include)} and exclude {list(self.exclude)}; widen include or narrow exclude "
                "(RunConfig.include / exclude)"
            )
        return found

    def generator(self, salt: str = "", seed: int | None = None) -> torch.Generator:
        """A CPU generator seeded from `seed` (default: the context seed, i.e. the run's sample seed) and a salt
        (e.g. a module name); a method with its own seed (a mask seed in its id) passes it here."""
        return seeded_generator(self.seed if seed is None else seed, salt)


# seeds 0…2**62 map to distinct generator seeds below (1_000_003 is prime to 2**63 − 1); the run's --seed has the
# same bound (options.MAX_SEED, defined there so that option parsing stays free of torch)
MAX_MASK_SEED = MAX_SEED


def seeded_generator(seed: int, salt: str = "") -> torch.Generator:
    """An explicit CPU torch.Generator seeded from `seed` and `salt` only (no global state)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + _stable_hash(salt)) % (2**63 - 1))
    return g


def _stable_hash(s: str) -> int:
    h = 0
    for ch in s.encode():
        h = (h * 131 + ch) % (2**61 - 1)
    return h


def param(
    default: Any,
    lo: float | None = None,
    hi: float | None = None,
    label: str | None = None,
    hint: str | None = None,
) -> Any:
    """A method parameter: a dataclass field whose value must lie in [lo, hi] (checked by Method.__post_init__,
    which names `label` or the field in its error and writes `hint`, or lo..hi, in place of it in the form)."""
    meta: dict[str, Any] = {"range": (lo, hi)} if lo is not None or hi is not None else {}
    if label:
        meta["label"] = label
    if hint:
        meta["hint"] = hint
    return field(default=default, metadata=meta)


def format_number(x: float | int) -> str:
    """Shortest plain decimal that reads back as `x` (4 → '4', 2.0 → '2', 0.5 → '0.5'; never exponent form)."""
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return str(x)
    if isinstance(x, int):
        return str(x)
    return format(Decimal(repr(float(x))).normalize(), "f")


_TOKEN = re.compile(r"\[([^\]]*)\]|\{(\w+)\}|([^\[{]+)")


_NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def _parse_form(form: str) -> list[tuple[str, Any]]:
    """'rtn-w{bits}-g{group}[-sym]' → [('lit', 'rtn-w'), ('field', 'bits'), …, ('opt', [('lit', '-sym')])]."""
    out: list[tuple[str, Any]] = []
    for opt, name, lit in _TOKEN.findall(form):
        if name:
            out.append(("field", name))
        elif lit:
            out.append(("lit", lit))
        else:
            out.append(("opt", _parse_form(opt)))
    return out


def _flag(tokens: list[tuple[str, Any]]) -> str:
    """The bool field an optional literal stands for: '[-sym]' → 'sym'."""
    return re.sub(r"\W", "_", "".join(v for _, v in tokens)).strip("_")


def forms_pattern(forms: Sequence[str]) -> re.Pattern[str]:
    """One regex full-matching any of `forms`; group '<field>__<k>' holds a field's text in form k, and an
    optional literal group '[-sym]' the bool field 'sym'."""

    def rx(tokens: list[tuple[str, Any]], k: int) -> str:
        parts = []
        for kind, v in tokens:
            if kind == "lit":
                parts.append(re.escape(v))
            elif kind == "field":
                parts.append(f"(?P<{v}__{k}>{_NUMBER})")
            elif all(t == "lit" for t, _ in v):
                parts.append(f"(?P<{_flag(v)}__{k}>{rx(v, k)})?")
            else:
                parts.append(f"(?:{rx(v, k)})?")
        return "".join(parts)

    return re.compile("|".join(f"(?:{rx(_parse_form(f), k)})" for k, f in enumerate(forms)))


@dataclass(frozen=True)
class Library:
    """An optional third-party library a method family needs: imported on first use, never at harness import.

    module: import name; dist and pin: the pip distribution and the version known to work here; pip: the install
    command it needs (e.g. "DISABLE_CUDA=1 pip install --no-build-isolation" for an sdist with CUDA sources)."""

    module: str
    dist: str
    pin: str
    extra: str = "adapters"
    pip: str = "pip install"

    @property
    def install(self) -> str:
        """The command that installs it: the harness's extra, or the library alone."""
        return f"pip install 'lcc-harness[{self.extra}]' or {self.pip} {self.dist}=={self.pin}"

    def missing(self) -> str | None:
        """Why the library cannot be imported here (one line), or None when it imports; cached per process."""
        if self.module not in _LIBRARY_STATUS:
            _LIBRARY_STATUS[self.module] = _try_import(self.module)
        why = _LIBRARY_STATUS[self.module]
        return f"{self.dist} is not installed" if why == _NOT_INSTALLED else why

    def load(self, method_id: str) -> Any:
        """The imported module, or a MethodError naming the pip command."""
        why = self.missing()
        if why is not None:
            raise MethodError(f"method '{method_id}' needs {self.dist} ({why}); install it: {self.install}")
        return importlib.import_module(self.module)

    def version(self) -> str:
        try:
            return dist_version(self.dist)
        except PackageNotFoundError:
            return "unknown"


_LIBRARY_STATUS: dict[str, str | None] = {}  # import name → why it does not import (None: it does)


_NOT_INSTALLED = "not installed"


def _try_import(module: str) -> str | None:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return _NOT_INSTALLED
    quiet = [logging.getLogger(module.split(".")[0])]  # torchao logs each CUDA-only .so it skips on a CPU box
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        importlib.import_module(module)
    except Exception as exc:  # a library's import may raise anything (ImportError, OSError of a .so, ...)
        lines = str(exc).strip().splitlines()
        return f"import {module} failed: {type(exc).__name__}: {lines[0] if lines else ''}"
    finally:
        for lg, lv in zip(quiet, levels, strict=True):
            lg.setLevel(lv)
    return None


ENGINES = ("torch", "llama.cpp")  # the engines a method may run on (Method.engines)


@dataclass(frozen=True)
class EngineSpec:
    """What a method asks of an engine that compresses by configuration instead of rewriting torch weights
    (llama.cpp): the GGUF weight type to quantize the reference to (None: the reference's weights) and the KV
    cache types (None: the reference's)."""

    weight_type: str | None = None
    type_k: str | None = None
    type_v: str | None = None

    def merged(self, other: EngineSpec) -> EngineSpec:
        """Both specs in one (a composite method); a part set twice is a MethodError."""
        out = {}
        for name in ("weight_type", "type_k", "type_v"):
            a, b = getattr(self, name), getattr(other, name)
            if a is not None and b is not None:
                raise MethodError(
                    f"a composite method sets the {name.replace('_', ' ')} twice ({a}, {b}); combine one "
                    "weight type with one KV-cache type, e.g. gguf-q4_k_m+kv-q8_0"
                )
            out[name] = a if a is not None else b
        return EngineSpec(**out)


@dataclass(frozen=True)
class Method:
    """Base class: a method is data. A family declares its parameters as dataclass fields (`param` for a
    range), its `forms` ("rtn-w{bits}-g{group}[-sym]": {field} a number, [..] optional, a bracketed literal a
    bool field of that name), `family`, `examples` and `description`, and implements `apply`. `pattern`,
    `from_match` and `id` are derived from the forms (the id is the first form that reads back as the same
    method; an optional part is written when its fields differ from their defaults); a family may still
    write its own."""

    family: ClassVar[str] = ""
    pattern: ClassVar[re.Pattern[str]] = re.compile(r"(?!)")
    forms: ClassVar[tuple[str, ...]] = ()  # human-readable id forms, e.g. "rtn-w{bits}-g{group}"
    examples: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    library: ClassVar[Library | None] = None  # an optional third-party library the family needs (adapters)
    engines: ClassVar[tuple[str, ...]] = ("torch",)  # the engines that run it (ENGINES); see engine_spec

    def engine_spec(self) -> EngineSpec:
        """What the llama.cpp engine must do for this method; only methods whose `engines` name it have one."""
        raise MethodError(f"method '{self.id}' has no llama.cpp form")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("forms") and "pattern" not in cls.__dict__:
            cls.pattern = forms_pattern(cls.forms)

    def __post_init__(self) -> None:
        for f in fields(self):
            lo, hi = f.metadata.get("range", (None, None))
            v = getattr(self, f.name)
            if v is None or (lo is None and hi is None):
                continue
            if not ((lo is None or lo <= v) and (hi is None or v <= hi)):
                lo_t, hi_t = (format_number(x) if x is not None else "" for x in (lo, hi))
                raise MethodError(
                    f"method '{self._draft_id()}': {f.metadata.get('label', f.name)}={format_number(v)} is out of "
                    f"range [{lo_t}, {hi_t}]; write it as {self._hint(f.name)}"
                )
        self.validate()

    def _hint(self, name: str) -> str:
        """The first form that holds {name}, every ranged field written as its range: 'w{2..8}a{2..16}'."""
        text = next((fm for fm in self.forms if f"{{{name}}}" in fm), self.family)
        for f in fields(self):
            lo, hi = f.metadata.get("range", (None, None))
            if lo is not None or hi is not None:
                rng = f"{format_number(lo) if lo is not None else ''}..{format_number(hi) if hi is not None else ''}"
                text = text.replace(f"{{{f.name}}}", f"{{{f.metadata.get('hint', rng)}}}")
        return text

    def validate(self) -> None:
        """Checks beyond the fields' ranges (raise MethodError); called by __post_init__."""

    # ---- ids from forms ---------------------------------------------------------------------------------
    def _render(self, form: str) -> str | None:
        """This method written in `form`, or None when a required field has no value."""
        defaults = {f.name: f.default for f in fields(self)}

        def render(tokens: list[tuple[str, Any]]) -> str | None:
            out = []
            for kind, v in tokens:
                if kind == "lit":
                    out.append(v)
                elif kind == "field":
                    value = getattr(self, v, None)
                    if value is None:
                        return None
                    out.append(format_number(value))
                elif all(t == "lit" for t, _ in v):
                    if getattr(self, _flag(v), False):
                        out.append("".join(x for _, x in v))
                else:
                    names = [x for t, x in v if t == "field"]
                    if any(getattr(self, n, None) != defaults.get(n) for n in names):
                        part = render(v)
                        if part is None:
                            return None
                        out.append(part)
            return "".join(out)

        return render(_parse_form(form))

    def _draft_id(self) -> str:
        """A best-effort id for error messages (no round-trip check: the values may be invalid)."""
        for form in self.forms:
            text = self._render(form)
            if text is not None:
                return text
        return self.family

    @property
    def id(self) -> str:
        for form in self.forms:
            text = self._render(form)
            m = self.pattern.fullmatch(text) if text is not None else None
            if m is not None and type(self).from_match(m) == self:
                return text
        raise TypeError(f"{type(self).__name__}: none of its forms {self.forms} writes {self!r} back")

    @classmethod
    def from_match(cls, m: re.Match[str]) -> Method:
        types = {f.name: str(f.type) for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, text in m.groupdict().items():
            if text is None:
                continue
            name = key.rsplit("__", 1)[0]
            t = types.get(name, "")
            if "bool" in t:
                kwargs[name] = True
            elif "float" in t:
                kwargs[name] = float(text)
            elif "." in text:
                raise MethodError(
                    f"method '{m.group(0)}': {name}={text} must be a whole number; write it as "
                    f"{' or '.join(cls.forms)}"
                )
            else:
                kwargs[name] = int(text)
        return cls(**kwargs)

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        """Compress `model` in place (the harness hands over a copy) and return it."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.id


class WeightMethod(Method):
    """A method that rewrites each target Linear on its own: a family implements `transform` (and optionally
    `prepare`, e.g. for calibration statistics); traversal, effective-bits accounting and the record of the
    outlier weights it changed (`method_info["outliers"]`, `["super_weights_zeroed"]`) live here."""

    def prepare(self, model: nn.Module, linears: list[tuple[str, nn.Linear]], ctx: CompressContext) -> Any:
        """Anything `transform` needs, computed once from the uncompressed model before any layer changes."""
        return None

    def transform(self, name: str, linear: nn.Linear, ctx: CompressContext, state: Any) -> float | None:
        """Rewrite `linear` in place; return its effective bits per weight (None: not a quantizer)."""
        raise NotImplementedError

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        linears = ctx.linears(model)
        watch = OutlierWatch(linears)  # the targets' outlier weights before anything changes
        state = self.prepare(model, linears, ctx)
        bits = []
        for name, lin in linears:
            b = self.transform(name, lin, ctx, state)
            if b is not None:
                bits.append((lin.weight.numel(), b))
        record_bits(ctx, bits)
        self.finish(ctx, state)
        watch.record(model, ctx.info)  # which of them the method zeroed or moved (outliers.py)
        return model

    def finish(self, ctx: CompressContext, state: Any) -> None:
        """Record facts for reports in ctx.info after every layer was transformed."""


def record_bits(ctx: CompressContext, per_layer: Sequence[tuple[int, float]]) -> None:
    """ctx.info['effective_bits'] = weight-count-weighted mean of (numel, bits) pairs (nothing when empty)."""
    n = sum(k for k, _ in per_layer)
    if n:
        ctx.info["effective_bits"] = sum(k * b for k, b in per_layer) / n


def check_range(method_id: str, name: str, value: float, lo: float, hi: float, form: str) -> None:
    """Raise MethodError unless lo <= value <= hi."""
    if not (lo <= value <= hi):
        raise MethodError(
            f"method '{method_id}': {name}={value} is out of range [{lo}, {hi}]; write it as {form}"
        )
