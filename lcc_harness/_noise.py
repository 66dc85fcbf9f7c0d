"""Known noise from libraries the harness imports, filtered out of the log once, when the package is imported."""

from __future__ import annotations

import logging


class _KnownImportNoise(logging.Filter):
    """Drops the log lines torchao (0.18) makes torch and itself write when it is imported on a CPU machine — "…
    is an Enum subclass … register_constant() on Enum subclasses is deprecated" (torch.utils._pytree) and "Failed
    to load …so: Could not load this library" for each CUDA-only extension (torchao) — which transformers triggers
    whenever torchao is installed. Installed once, when the harness is imported (`quiet_known_import_noise`);
    any other record passes."""

    NOISE = ("register_constant() on Enum subclasses is deprecated", "Could not load this library")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)


_NOISE_FILTER = _KnownImportNoise()


def quiet_known_import_noise() -> None:
    """Attach the filter to the two loggers (idempotent)."""
    for name in ("torch.utils._pytree", "torchao"):
        lg = logging.getLogger(name)
        if _NOISE_FILTER not in lg.filters:
            lg.addFilter(_NOISE_FILTER)
