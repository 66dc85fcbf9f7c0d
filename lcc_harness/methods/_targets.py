"""The one helper that finds the modules a method compresses."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence

import torch
from torch import nn

# Every nn.Linear inside the decoder blocks; LM head and embeddings are left alone unless included.
DEFAULT_INCLUDE: tuple[str, ...] = ("*layers.*", "*.h.*", "*.blocks.*")


def iter_linears(
    model: nn.Module, include: Sequence[str] = DEFAULT_INCLUDE, exclude: Sequence[str] = ()
) -> Iterator[tuple[str, nn.Linear]]:
    """Yield (qualified name, nn.Linear) whose name matches any `include` glob and no `exclude` glob.
    (GPT-2's `Conv1D` layers count once `linearize_conv1d` has turned them into Linears; the harness does that
    when it loads a model.)"""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not any(fnmatch.fnmatchcase(name, pat) for pat in include):
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            continue
        yield name, module


def linearize_conv1d(model: nn.Module) -> int:
    """Replace every transformers `Conv1D` (GPT-2 family: y = x·W + b with W (in, out)) by the equivalent
    `nn.Linear` (weight Wᵀ (out, in)), in place, so that every method sees one kind of target. Returns how many."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return 0
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in found:
        w = conv.weight  # (in, out)
        lin = nn.Linear(w.shape[0], w.shape[1], bias=conv.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.t())
            if conv.bias is not None:
                lin.bias.copy_(conv.bias)
        lin.requires_grad_(w.requires_grad)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, lin)
    return len(found)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (Llama-style `model.layers`, GPT-style `h`/`blocks`)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            return module
    raise ValueError(f"{type(model).__name__} has no decoder block list (layers/h/blocks)")
