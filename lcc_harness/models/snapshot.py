"""Compress the loaded model in place and put it back: one copy of the model on the device.

`Snapshot(model)` keeps, in host memory, a copy of every parameter and buffer (tied tensors once) and, per
module, its attribute table with the contents of its containers (`_parameters`, `_modules`, hook dicts, …).
`restore()` puts the tables back (dropping modules, hooks and attributes a method added, returning replaced
children and parameters) and copies every tensor back from host memory into its original storage (or re-points
it when a method changed its shape, dtype or device). All tensors are copied back, not only those that look
changed: a method may write through `.data`, which no version counter sees.

On a GPU this keeps one model on the device (the host holds the copy; host → device at ~10+ GB/s costs about a
second for a 7B bf16 model per method); on a CPU the host copy lives in the same RAM, so peak memory is that of
the deep-copy strategy (two copies) without its per-method allocations (`bench/`).
The model's configs (every module's `config` and the configs nested in it) get their attributes back too: kv
methods switch the attention implementation there. Not restored: other shared objects and global torch state —
the harness's reference check after every method (Harness.check_reference_intact) catches what they change.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_CONTAINERS = (dict, set, list)


class Snapshot:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._tables: list[tuple[nn.Module, dict[str, Any], dict[int, Any]]] = []
        self._tensors: list[tuple[torch.Tensor, torch.Tensor, torch.device]] = []
        self._host: dict[int, torch.Tensor] = {}
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self._configs: list[tuple[Any, dict[str, Any]]] = []  # (config, its attributes): kv methods switch
        seen: set[int] = set()  # the attention implementation there
        with torch.no_grad():
            for mod in model.modules():
                self._keep_config(mod.__dict__.get("config"), seen)
                table = dict(mod.__dict__)
                contents = {id(v): _copy_container(v) for v in table.values() if isinstance(v, _CONTAINERS)}
                self._tables.append((mod, table, contents))
                for t in (*mod._parameters.values(), *mod._buffers.values()):
                    if t is None or id(t) in seen or t.device.type == "meta":
                        continue
                    seen.add(id(t))
                    self._tensors.append((t, t.detach().to("cpu", copy=True), t.device))
                    self._host[id(t)] = self._tensors[-1][1]

    def _keep_config(self, cfg: Any, seen: set[int]) -> None:
        """A module's (transformers) config and the configs nested in it, their attributes kept by value."""
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "to_dict"):
            return
        seen.add(id(cfg))
        self._configs.append((cfg, dict(cfg.__dict__)))
        for v in list(cfg.__dict__.values()):
            self._keep_config(v, seen)

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for _, h, _ in self._tensors)

    def original(self, t: torch.Tensor) -> torch.Tensor | None:
        """The host copy of parameter/buffer `t` as it was at the snapshot (None: not one of the model's)."""
        return self._host.get(id(t))

    @torch.no_grad()
    def changed(self, t: torch.Tensor | None) -> bool:
        host = None if t is None else self.original(t)
        if t is None or host is None:
            return False
        return t.shape != host.shape or t.dtype != host.dtype or not torch.equal(t.detach().cpu(), host)

    def head_changed(self) -> bool:
        """Whether the LM head module of the snapshot had its weight or bias changed in place since."""
        h = self.head
        return h is not None and (
            self.changed(getattr(h, "weight", None)) or self.changed(getattr(h, "bias", None))
        )

    def restore(self) -> None:
        """Put the model back as it was when the snapshot was taken."""
        for cfg, attrs in self._configs:
            cfg.__dict__.clear()
            cfg.__dict__.update(attrs)
        for mod, table, contents in self._tables:
            d = mod.__dict__
            for k in [k for k in d if k not in table]:
                del d[k]
            for k, v in table.items():
                if id(v) in contents:
                    _refill(v, contents[id(v)])
                d[k] = v
        with torch.no_grad():
            for t, host, device in self._tensors:
                if t.shape == host.shape and t.dtype == host.dtype and t.device == device:
                    t.data.copy_(host)
                else:  # the method re-pointed the tensor (other shape, dtype or device)
                    t.data = host.to(device, copy=True)


def _copy_container(v: Any) -> Any:
    return dict(v) if isinstance(v, dict) else set(v) if isinstance(v, set) else list(v)


def _refill(v: Any, saved: Any) -> None:
    """Put `saved`'s contents back into the container object `v` (kept: hook handles and others hold it)."""
    if isinstance(v, (dict, set)):
        v.clear()
        v.update(saved)
    else:
        v[:] = saved
