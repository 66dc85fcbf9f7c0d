"""Which passes a curve needs: the window design's one pass per sample (passes_for), the matched design's ids
(matched_ids), and the check that a model's outputs do not depend on the sequence length."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def matched_ids(ids: torch.Tensor, length: int) -> torch.Tensor:
    """ids (N,) → its last `length` tokens (length,): the input of the matched-target design at context length
    `length`. Its last T positions are the sample's fixed target span (the same tokens for every length), each
    read with `length` − T + its offset tokens of context."""
    if not 0 < length <= ids.shape[0]:
        raise ValueError(f"matched input of {length} tokens from a sample of {ids.shape[0]}")
    return ids[ids.shape[0] - length :]


def passes_for(lengths: Sequence[int], one_pass: bool) -> dict[int, tuple[int, ...]]:
    """Forward-pass length → the context lengths summarized from it."""
    lengths = tuple(sorted(lengths))
    if one_pass:
        return {lengths[-1]: lengths}
    return {L: (L,) for L in lengths}


def length_dependence(model: nn.Module) -> str | None:
    """A reason why outputs at a position may depend on the total sequence length, from the config."""
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rope, dict):
        sub = [rope] + [v for v in rope.values() if isinstance(v, dict)]
        for r in sub:
            kind = r.get("rope_type") or r.get("type")
            if kind in ("dynamic", "longrope"):
                return f"rope scaling '{kind}' changes with sequence length"
    return None
