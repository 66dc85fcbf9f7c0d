"""Writing files so that a reader sees the old file or the complete new one, never half of either.

One writer for everything the harness keeps (baselines, reports, the reference cache, `lcc measure --json`):
the bytes go to a temp file in the same folder, are fsynced, and the temp file is renamed over the target.
`write_json` is the one JSON writer, with one policy for what JSON cannot hold: NaN and ±Infinity are written as
null (a non-finite measurement is already a failed check or an error, reported as such), anything else that is
not JSON as its str(). Baselines refuse non-finite values before they reach it (gate.baselines).
Files get the permissions the umask gives a new file (mkstemp alone would make them 0600, so a cache shared
between users would not work).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], data: bytes | Callable[[str], None]) -> Path:
    """Write `data` (bytes, or a function that writes the file at the temp path it is given) to `path` atomically.

    For fault-injection tests, LCC_TEST_SLOW_WRITE=<seconds> pauses halfway through writing bytes and again
    before the rename. Returns the path."""
    path = Path(path)
    try:
        pause = max(float(os.environ.get("LCC_TEST_SLOW_WRITE") or 0), 0.0)
    except ValueError:
        pause = 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                half = len(data) // 2 if pause else len(data)
                f.write(data[:half])
                if pause:
                    f.flush()
                    time.sleep(pause)
                f.write(data[half:])
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if pause:
            time.sleep(pause)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def read_head(
    path: str | os.PathLike[str], n: int, what: str, error: type[Exception], fix: str
) -> tuple[int, bytes]:
    """(size, first `n` bytes) of a file a user named; `error` with one line naming `what`, the path and `fix` when
    it is missing, unreadable, a directory, or not a regular file (a FIFO, socket or device is never opened, so
    it cannot block)."""
    import stat

    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise error(f"{what} '{p}' cannot be read ({exc.strerror or exc}); check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} '{p}' is a directory; {fix}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} '{p}' is not a regular file (a FIFO, socket or device); {fix}")
    try:
        with open(p, "rb") as f:
            return st.st_size, f.read(n)
    except OSError as exc:
        raise error(f"{what} '{p}' cannot be read ({exc.strerror or exc}); check its permissions") from None


def json_safe(obj: Any) -> Any:
    """`obj` with NaN/±Infinity floats as None and tuples as lists, so the JSON is valid for every reader."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = 1, sort_keys: bool = True, ascii_only: bool = True) -> str:
    """The JSON text `write_json` writes (without its final newline): non-finite floats as null, other objects
    JSON cannot hold as their str()."""
    return json.dumps(
        json_safe(obj),
        indent=indent,
        sort_keys=sort_keys,
        ensure_ascii=ascii_only,
        allow_nan=False,
        default=str,
    )


def write_json(
    path: str | os.PathLike[str],
    obj: Any,
    indent: int | None = 1,
    sort_keys: bool = True,
    ascii_only: bool = True,
) -> Path:
    """Write `obj` as JSON to `path` atomically (json_text, then a newline); returns the path."""
    return atomic_write(path, (json_text(obj, indent, sort_keys, ascii_only) + "\n").encode())
