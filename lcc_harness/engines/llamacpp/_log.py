"""llama.cpp's recent warning and error lines (its log callback, set in llamacpp.binding, appends here), for the
one-line messages of the engine and of the GGUF file helpers."""

from __future__ import annotations

LINES: list[str] = []


def record(line: str) -> None:
    LINES.append(line)
    del LINES[:-8]


def last_log_error() -> str:
    """The last warning or error line llama.cpp logged (empty when none)."""
    return LINES[-1][:200] if LINES else ""


def clear() -> None:
    LINES.clear()
