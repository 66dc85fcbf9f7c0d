"""Method registry: a method is a frozen dataclass whose id is its one name everywhere.

A family registers a `Method` subclass with `@register`. Its `pattern` full-matches ids of the family and
`from_match` builds an instance; `id` writes the canonical id back, so `parse_method(m.id) == m`.
Third parties register families through the `lcc_harness.methods` entry-point group, or with
`@register` in a conftest.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

from lcc_harness.errors import MethodError
from lcc_harness.methods._base import (  # the method API: plugins import it from here
    ENGINES,
    MAX_MASK_SEED,
    CompressContext,
    EngineSpec,
    Library,
    Method,
    WeightMethod,
    check_range,
    format_number,
    forms_pattern,
    param,
    record_bits,
    seeded_generator,
)

log = logging.getLogger(__name__)


ENTRY_POINT_GROUP = "lcc_harness.methods"


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
    from lcc_harness import methods as pkg

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
    """family name → Method subclass, built-ins and plugins; a family whose library does not import here
    (`Method.library`) is left out (see `unavailable`)."""
    _load_all()
    return {k: c for k, c in _FAMILIES.items() if c.library is None or c.library.missing() is None}


def unavailable() -> dict[str, type[Method]]:
    """family name → Method subclass of the registered families whose library does not import here."""
    _load_all()
    return {k: c for k, c in _FAMILIES.items() if c.library is not None and c.library.missing() is not None}


def examples() -> list[str]:
    """Every registered family's example ids (built-ins and plugins), in registration order."""
    return [e for cls in families().values() for e in cls.examples]


@dataclass(frozen=True)
class Composite(Method):
    """Methods applied together, written with '+': a GGUF weight type and a KV-cache type on llama.cpp
    (gguf-q4_k_m+kv-q8_0). Its engines are those every part runs on."""

    parts: tuple[Method, ...] = ()

    family = "composite"

    @property
    def id(self) -> str:
        return "+".join(p.id for p in self.parts)

    @property
    def engines(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(e for e in ENGINES if all(e in p.engines for p in self.parts))

    def validate(self) -> None:
        if "llama.cpp" not in self.engines:
            raise MethodError(
                f"method '{self.id}': only llama.cpp methods compose with '+' (a GGUF weight type and a KV-cache "
                "type, e.g. gguf-q4_k_m+kv-q8_0)"
            )
        self.engine_spec()  # a part set twice is refused here

    def engine_spec(self) -> EngineSpec:
        spec = EngineSpec()
        for p in self.parts:
            spec = spec.merged(p.engine_spec())
        return spec


def parse_method(method_id: str) -> Method:
    """Build the Method for an id; unknown ids raise MethodError listing close matches and valid forms, and an id
    that two families match raises MethodError naming both. 'a+b' composes llama.cpp methods (Composite)."""
    _load_all()
    text = method_id.strip()
    if "+" in text:
        parts = [t.strip() for t in text.split("+")]
        if any(not t for t in parts):
            raise MethodError(f"method id '{text}' has an empty part; write e.g. gguf-q4_k_m+kv-q8_0")
        return Composite(tuple(parse_method(t) for t in parts))
    hits = [(cls, m) for cls in _FAMILIES.values() if (m := cls.pattern.fullmatch(text))]
    if len(hits) > 1:
        names = " and ".join(f"'{c.family}' ({_qual(c)})" for c, _ in hits)
        raise MethodError(f"method id '{text}' is matched by families {names}; make their patterns disjoint")
    if hits:
        cls, m = hits[0]
        if cls.library is not None:
            cls.library.load(text)
        return cls.from_match(m)
    known = list(dict.fromkeys(f for cls in _FAMILIES.values() for f in (*cls.examples, *cls.forms)))
    close = difflib.get_close_matches(text, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    forms = ", ".join(f for cls in _FAMILIES.values() for f in cls.forms)
    broken = "".join(f"; method plugin '{k}' failed to load ({v})" for k, v in _PLUGIN_ERRORS.items())
    raise MethodError(
        f"unknown method id '{method_id}'; {hint}valid forms: {forms} (see `lcc methods`){broken}"
    )


def parse_methods(ids: Sequence[str]) -> list[Method]:
    return [parse_method(i) for i in ids]


__all__ = [
    "Composite",
    "CompressContext",
    "ENGINES",
    "ENTRY_POINT_GROUP",
    "EngineSpec",
    "Library",
    "MAX_MASK_SEED",
    "Method",
    "WeightMethod",
    "check_range",
    "examples",
    "families",
    "format_number",
    "forms_pattern",
    "param",
    "parse_method",
    "parse_methods",
    "record_bits",
    "register",
    "seeded_generator",
    "unavailable",
    "unregister",
]
