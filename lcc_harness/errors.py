"""Exceptions a user can act on. CLI and plugin print them as one line (no traceback)."""


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters written as escapes: a message that echoes a user's
    value (a path, an option) stays one line."""
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in str(text))


class HarnessError(Exception):
    """Base class: the message names the problem and the fix (always one line, see `one_line`)."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (one_line(args[0]),)
        super().__init__(*args)


class ModelNotFoundError(HarnessError):
    """A model spec that resolves to nothing on this machine (never downloaded)."""


class ModelLoadError(HarnessError):
    """A model that exists but cannot be loaded (corrupt file, missing tokenizer, ...)."""


class CorpusError(HarnessError):
    """A corpus that is missing, unreadable or too small for the requested samples."""


class MethodError(HarnessError):
    """An unknown method id or parameters out of range."""


class LengthError(HarnessError):
    """Bad context lengths (non-positive, duplicates, beyond the model's positions)."""


class NonFiniteError(HarnessError):
    """A compressed model produced NaN or Inf."""


class BaselineError(HarnessError):
    """A baseline file that is corrupt, of the wrong schema, or for another model/dtype/device."""


class MethodRunError(HarnessError):
    """A method raised while compressing a model; the message names the method and the exception."""


class OOMError(HarnessError):
    """Compression or measurement ran out of memory; the message names the length and what to reduce."""


class ReportDirError(HarnessError, OSError):
    """The report directory cannot be created or written; the message names it and the fix."""


class WriteError(HarnessError, OSError):
    """A file could not be written (full disk, file size limit, I/O error); the old file, if any, is untouched."""


class CheckpointError(HarnessError):
    """A compressed checkpoint that is not the reference model up to its weights (tokenizer or architecture)."""


def first_line(exc: BaseException, with_type: bool = True) -> str:
    """'Type: first line of the message' (at most 200 characters of it) for one-line error messages."""
    lines = str(exc).strip().splitlines()
    text = lines[0][:200] if lines else ""
    if not with_type:
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
