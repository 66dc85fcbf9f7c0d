"""Work shared between the processes of one run: pytest-xdist's controller and its workers.

`RunStore` is a folder the controller creates and hands to every worker (xdist's `workerinput`). In it:
  outcome-<method>.json   a method's outcome and result, written atomically the moment it is complete
  started-<method>.json   who began computing it (a marker that outlives a worker killed mid-method)
  outcome-<method>.lock   a file lock: a method is computed by one process; others wait and read its result
  part-<worker>.json      the worker's run record, rewritten after every test it finishes

So each method is compressed and measured once per run whichever worker needs it (its own cases, a claim that
needs several methods), a worker that dies loses only the method it was running, and the controller builds the
report and the baseline update from the folder, not from what workers hand over at their own end.

Locks are `filelock` locks (fcntl on POSIX): released by the operating system when their holder dies. A process
never waits for a lock while holding another, so two workers cannot deadlock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lcc_harness.files import write_json
from lcc_harness.record import RunRecord, died_message

Outcome = dict[str, Any]  # {'status', 'error', 'result': MethodResult | None}


def _slug(method_id: str) -> str:
    """A file-name-safe, collision-free name for a method id."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", method_id)[:80]
    return f"{safe}-{hashlib.sha256(method_id.encode()).hexdigest()[:8]}"


class RunStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    # ---- per-method outcomes --------------------------------------------------------------------------------
    def _files(self, method_id: str) -> tuple[Path, Path, Path]:
        s = _slug(method_id)
        return (
            self.path / f"outcome-{s}.json",
            self.path / f"started-{s}.json",
            self.path / f"outcome-{s}.lock",
        )

    def outcome(self, method_id: str, compute: Callable[[], Outcome], who: str) -> Outcome:
        """The method's outcome: read from the store when some process finished it, else computed here (under its
        lock, so no other process computes it at the same time) and stored. A method whose computing process died
        comes back as an error outcome naming that process."""
        from filelock import FileLock

        done, started, lock = self._files(method_id)
        with FileLock(str(lock)):
            if done.exists():
                return _load_outcome(json.loads(done.read_text()))
            if started.exists():
                who_died = json.loads(started.read_text()).get("who", "?")
                return {"status": "error", "error": died_message(method_id, who_died), "result": None}
            write_json(
                started, {"method": method_id, "who": who, "pid": os.getpid()}, indent=None, sort_keys=False
            )
            out = compute()
            write_json(done, _dump_outcome(method_id, out), indent=None, sort_keys=False)
            return out

    def unfinished(self) -> dict[str, str]:
        """Methods some process started and none finished (its process died): method id → who."""
        out: dict[str, str] = {}
        for f in sorted(self.path.glob("started-*.json")):
            meta = json.loads(f.read_text())
            if not (self.path / f.name.replace("started-", "outcome-", 1)).exists():
                out[meta["method"]] = meta.get("who", "?")
        return out

    # ---- per-worker records ---------------------------------------------------------------------------------
    def save_part(self, who: str, record: RunRecord) -> None:
        write_json(self.path / f"part-{who}.json", record.to_dict(), indent=None, sort_keys=False)

    def parts(self) -> list[RunRecord]:
        return [RunRecord.from_dict(json.loads(f.read_text())) for f in sorted(self.path.glob("part-*.json"))]


def _dump_outcome(method_id: str, o: Outcome) -> dict[str, Any]:
    res = o.get("result")
    return {
        "method": method_id,
        "status": o["status"],
        "error": o.get("error", ""),
        "result": None if res is None else res.to_dict(),
    }


def _load_outcome(d: dict[str, Any]) -> Outcome:
    from lcc_harness.engines.results import MethodResult

    res = d.get("result")
    return {
        "status": d["status"],
        "error": d.get("error", ""),
        "result": None if res is None else MethodResult.from_dict(res),
    }
