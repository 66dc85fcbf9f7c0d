"""pytest-xdist's `loadgroup` scheduling, mended (imported only under `--dist loadgroup`).

Grouping: xdist 3.8 groups by an `@group` suffix its workers append to node ids, by assigning `item._nodeid`;
pytest 9 derives `nodeid` from `item._id`, so the suffix never appears and every test is its own unit (a method's
cases would be spread over workers). Here a node id without the suffix is grouped by the method id its
parameters start with (the session's method ids, longest match), which is what the harness's `xdist_group` marks
say; other tests stay units of their own, as under `--dist load`.

pytest-xdist 3.8's LoadScopeScheduling, which loadgroup extends, breaks when a worker dies: the whole work unit,
including the test that was running, goes back to the queue (a method that kills its process would kill every
replacement worker in turn), and the replacement is given work before it has reported its collection
(INTERNALERROR KeyError, or a run that never ends). Here the crashed test is marked done (xdist reports it as
failed, naming the worker), the rest of its group goes to the next free worker (where the harness fails the
method's remaining cases at once: share.RunStore knows its process died), and a worker gets work only once
its collection is in.
"""

from __future__ import annotations

from typing import Any

from xdist.scheduler.loadgroup import LoadGroupScheduling


def method_of(nodeid: str, method_ids: list[str]) -> str | None:
    """The method a parametrized harness test belongs to: '…[rtn-w3-g64-1024]' → 'rtn-w3-g64'."""
    if not nodeid.endswith("]") or "[" not in nodeid:
        return None
    params = nodeid[nodeid.index("[") + 1 : -1]
    hits = [m for m in method_ids if params == m or params.startswith(m + "-")]
    return max(hits, key=len) if hits else None


class GroupScheduling(LoadGroupScheduling):
    def __init__(self, config: Any, log: Any = None, method_ids: list[str] | None = None) -> None:
        super().__init__(config, log)
        self.method_ids = list(method_ids or [])

    def _split_scope(self, nodeid: str) -> str:
        if nodeid.rfind("@") > nodeid.rfind("]"):  # an xdist that renames node ids (pytest < 9)
            return nodeid.split("@")[-1]
        method = method_of(nodeid, self.method_ids)
        return f"lcc-method:{method}" if method else nodeid

    def _reschedule(self, node: Any) -> None:
        if node not in self.registered_collections:  # a replacement worker still collecting
            return
        super()._reschedule(node)

    def remove_node(self, node: Any) -> str | None:
        crashed = None
        for unit in self.assigned_work.get(node, {}).values():
            crashed = next((nodeid for nodeid, done in unit.items() if not done), None)
            if crashed is not None:
                unit[crashed] = True  # reported as crashed by xdist; never run again
                break
        super().remove_node(node)
        return crashed
