"""Method registry: a method is a frozen dataclass whose id is its one name everywhere.

A family registers a `Method` subclass with `@register`. Its `pattern` full-matches ids of the family and
`from_match` builds an instance; `id` writes the canonical id back, so `parse_method(m.id) == m`.
Third parties register families through the `lcc_harness.methods` entry-point group, or with
`@register` in a conftest.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import pkgutil
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import ClassVar

import torch
from torch import nn

from ..errors import MethodError
from ..targets import DEFAULT_INCLUDE, iter_linears, linearize_conv1d

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lcc_harness.methods"


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

    def generator(self, salt: str = "") -> torch.Generator:
        """A CPU generator seeded from the context seed and a salt (e.g. a module name)."""
        g = torch.Generator(device="cpu")
        g.manual_seed((self.seed * 1_000_003 + _stable_hash(salt)) % (2**63 - 1))
        return g


def _stable_hash(s: str) -> int:
    h = 0
    for ch in s.encode():
        h = (h * 131 + ch) % (2**61 - 1)
    return h


@dataclass(frozen=True)
class Method:
    """Base class. Subclasses set the ClassVars, fields for parameters, and implement `apply`."""

    family: ClassVar[str] = ""
    pattern: ClassVar[re.Pattern[str]] = re.compile(r"(?!)")
    forms: ClassVar[tuple[str, ...]] = ()  # human-readable id forms, e.g. "rtn-w{bits}-g{group}"
    examples: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    @property
    def id(self) -> str:
        raise NotImplementedError

    @classmethod
    def from_match(cls, m: re.Match[str]) -> Method:
        raise NotImplementedError

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        """Compress `model` in place (the harness hands over a copy) and return it."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.id


_FAMILIES: dict[str, type[Method]] = {}
_loaded = False
_PLUGIN_ERRORS: dict[str, str] = {}  # entry-point name → why it could not be loaded


def register(cls: type[Method] | None = None, *, replace: bool = False):
    """Class decorator registering a Method family: `@register`, or `@register(replace=True)` to replace an
    already registered family of the same name on purpose (e.g. a patched built-in in a conftest).

    Refused with a MethodError naming both classes: a family name already taken by another class, and a family
    whose ids another family also matches (each family's examples are parsed by every other pattern), so that no
    plugin can silently hijack a built-in's ids and overwrite its baselines."""

    def deco(c: type[Method]) -> type[Method]:
        _register(c, replace)
        return c

    return deco if cls is None else deco(cls)


def _register(cls: type[Method], replace: bool) -> None:
    if not cls.family:
        raise TypeError(f"{cls.__name__} must set `family`")
    old = _FAMILIES.get(cls.family)
    if old is not None and old is not cls and not replace:
        raise MethodError(
            f"method family '{cls.family}' of {_qual(cls)} is already registered by {_qual(old)}; choose "
            "another family name, or register(replace=True) to replace it on purpose"
        )
    for other in _FAMILIES.values():
        if other.family == cls.family:
            continue
        clash = next((e for e in cls.examples if other.pattern.fullmatch(e)), None) or next(
            (e for e in other.examples if cls.pattern.fullmatch(e)), None
        )
        if clash:
            raise MethodError(
                f"method id '{clash}' is matched by both family '{cls.family}' ({_qual(cls)}) and family "
                f"'{other.family}' ({_qual(other)}); make the patterns disjoint"
            )
    _FAMILIES[cls.family] = cls


def _qual(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def unregister(family: str) -> None:
    _FAMILIES.pop(family, None)


def _load_all() -> None:
    """Import every built-in method module once (an import error propagates: it is a bug in the harness), then
    the entry-point plugins (a broken one is recorded and named by `parse_method`'s unknown-id error)."""
    global _loaded
    if _loaded:
        return
    from .. import methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name == "registry":
            continue
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    _loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, Method) and _FAMILIES.get(obj.family) is not obj:
                register(obj)
        except Exception as exc:  # a broken plugin must not take the harness down
            lines = str(exc).strip().splitlines()
            _PLUGIN_ERRORS[ep.name] = f"{type(exc).__name__}: {lines[0] if lines else ''}"
            log.warning("method plugin %s could not be loaded: %s", ep.name, exc)


def families() -> dict[str, type[Method]]:
    """family name → Method subclass, built-ins and plugins."""
    _load_all()
    return dict(_FAMILIES)


def examples() -> list[str]:
    """Every registered family's example ids (built-ins and plugins), in registration order."""
    return [e for cls in families().values() for e in cls.examples]


def parse_method(method_id: str) -> Method:
    """Build the Method for an id; unknown ids raise MethodError listing close matches and valid forms, and an id
    that two families match raises MethodError naming both."""
    _load_all()
    text = method_id.strip()
    hits = [(cls, m) for cls in _FAMILIES.values() if (m := cls.pattern.fullmatch(text))]
    if len(hits) > 1:
        names = " and ".join(f"'{c.family}' ({_qual(c)})" for c, _ in hits)
        raise MethodError(f"method id '{text}' is matched by families {names}; make their patterns disjoint")
    if hits:
        cls, m = hits[0]
        return cls.from_match(m)
    known = [f for cls in _FAMILIES.values() for f in (*cls.examples, *cls.forms)]
    close = difflib.get_close_matches(text, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    forms = ", ".join(f for cls in _FAMILIES.values() for f in cls.forms)
    broken = "".join(f"; method plugin '{k}' failed to load ({v})" for k, v in _PLUGIN_ERRORS.items())
    raise MethodError(
        f"unknown method id '{method_id}'; {hint}valid forms: {forms} (see `lcc methods`){broken}"
    )


def parse_methods(ids: Sequence[str]) -> list[Method]:
    return [parse_method(i) for i in ids]


def check_range(method_id: str, name: str, value: float, lo: float, hi: float, form: str) -> None:
    """Raise MethodError unless lo <= value <= hi."""
    if not (lo <= value <= hi):
        raise MethodError(
            f"method '{method_id}': {name}={value} is out of range [{lo}, {hi}]; write it as {form}"
        )
