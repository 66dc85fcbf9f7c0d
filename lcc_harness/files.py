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
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def current_umask() -> int:
    """The process's umask (read by setting and restoring it)."""
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
    tmp = _staged(path, data, pause)
    try:
        if pause:
            time.sleep(pause)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _raise_write_error(path, exc)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_many(items: list[tuple[str | os.PathLike[str], bytes]]) -> list[Path]:
    """Write several files as one set: every file goes to a temp file beside its target first; only when all of
    them are written and fsynced are they renamed over their targets (renames need no space). A failure (a full
    disk) leaves every target as it was — a reader never sees a new JSON beside an old Markdown."""
    done: list[tuple[str, Path]] = []
    try:
        for path, data in items:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            done.append((_staged(path, data), path))
    except BaseException:
        for tmp, _ in done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    for tmp, path in done:
        os.replace(tmp, path)
    for folder in {path.parent for _, path in done}:
        _fsync_dir(folder)
    return [p for _, p in done]


def _staged(path: Path, data: bytes | Callable[[str], None], pause: float = 0.0) -> str:
    """A fsynced temp file beside `path` holding `data` (bytes, or what the function wrote at the temp path), not
    renamed yet; removed again, and the disk's refusal raised as WriteError, when writing fails. `pause`: the
    fault-injection pause halfway through the bytes (atomic_write)."""
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
        os.chmod(tmp, 0o666 & ~current_umask())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _raise_write_error(path, exc)
        raise
    return tmp


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (best effort)."""
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _raise_write_error(path: Path, exc: BaseException) -> None:
    """Raise WriteError (one line naming `path`) from `exc` when it is the disk's refusal; return otherwise."""
    if _io_failure(exc):
        from .errors import WriteError

        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise WriteError(
            f"could not write '{path}': {reason}; the previous file, if any, is unchanged — free space on "
            "that disk or write to another folder"
        ) from exc


def _io_failure(exc: BaseException) -> bool:
    """Whether `exc` is the disk's refusal (no space, file size limit, I/O error) rather than a writer's own error:
    an OSError that is not already one of ours, or a library's wrapped I/O error (safetensors: "I/O error: …")."""
    from .errors import HarnessError

    if isinstance(exc, HarnessError):
        return False
    return isinstance(exc, OSError) or (isinstance(exc, Exception) and "I/O error" in str(exc))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted), read in 16 MiB blocks."""
    import hashlib

    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """Where the harness keeps its caches: $LCC_CACHE_DIR, else $XDG_CACHE_HOME/lcc-harness, else
    ~/.cache/lcc-harness."""
    env = os.environ.get("LCC_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lcc-harness"


@contextlib.contextmanager
def entry_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the file lock of a cache entry (`<path minus suffix>.lock`): one process (an xdist worker, a second run
    or CI job on a shared cache) computes the entry; the others wait, then find it written. A folder where no lock
    file can be made (read-only) is used without one. Check whether the entry exists *inside* the lock."""
    from filelock import FileLock

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.with_suffix(".lock")))
        lock.acquire()
    except OSError as exc:
        log.warning("cache %s: no lock (%s); computing without one", path.parent, exc)
        yield
        return
    try:
        yield
    finally:
        lock.release()


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
