"""The one helper that finds the modules a method compresses."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence

from torch import nn

# Every nn.Linear inside the decoder blocks; LM head and embeddings are left alone unless included.
DEFAULT_INCLUDE: tuple[str, ...] = ("*layers.*", "*.h.*", "*.blocks.*")


def iter_linears(
    model: nn.Module, include: Sequence[str] = DEFAULT_INCLUDE, exclude: Sequence[str] = ()
) -> Iterator[tuple[str, nn.Linear]]:
    """Yield (qualified name, nn.Linear) whose name matches any `include` glob and no `exclude` glob."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not any(fnmatch.fnmatchcase(name, pat) for pat in include):
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            continue
        yield name, module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (Llama-style `model.layers`, GPT-style `h`/`blocks`)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            return module
    raise ValueError(f"{type(model).__name__} has no decoder block list (layers/h/blocks)")
