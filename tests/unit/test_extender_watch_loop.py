"""The list/watch loop: events into the cache, 410 -> re-list, errors -> back off."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from joulepool.kube import testing as T
from joulepool.kube.state import ClusterState
from joulepool.kube.watch import Watcher, node_handlers, plan_handlers, pod_handlers


def _direct(fn: Callable[..., None], *args: Any) -> None:
    fn(*args)


class Script:
    """A fake API server: list results and watch streams, consumed in order."""

    def __init__(self, lists: list[Any], watches: list[Any], stop: threading.Event) -> None:
        self.lists = lists
        self.watches = watches
        self.stop = stop
        self.watch_rvs: list[str] = []

    def list_fn(self) -> tuple[list[dict[str, Any]], str]:
        item = self.lists.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def watch_fn(self, rv: str) -> Iterator[dict[str, Any]]:
        self.watch_rvs.append(rv)
        if not self.watches:
            self.stop.set()
            return
        item = self.watches.pop(0)
        if isinstance(item, Exception):
            raise item
        yield from item


def _run(script: Script, handlers: Any) -> Watcher:
    w = Watcher("test", script.list_fn, script.watch_fn, handlers, _direct, script.stop,
                backoff_initial=0.001, backoff_max=0.002)
    w.run()  # in this thread: returns when the script runs out
    return w


def _rv(obj: dict[str, Any], rv: str) -> dict[str, Any]:
    obj["metadata"]["resourceVersion"] = rv
    return obj


def test_list_then_events_then_bookmark_then_410_relist() -> None:
    state = ClusterState()
    stop = threading.Event()
    script = Script(
        lists=[([T.node("a"), T.node("b")], "10"), ([T.node("c")], "50")],
        watches=[
            [
                {"type": "ADDED", "object": _rv(T.node("d", "L4", 2), "11")},
                {"type": "DELETED", "object": _rv(T.node("a"), "12")},
                {"type": "BOOKMARK",
                 "object": {"kind": "Node", "metadata": {"resourceVersion": "20"}}},
            ],
            [{"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                          "message": "too old resource version"}}],
        ],
        stop=stop,
    )
    w = _run(script, node_handlers(state))
    # the watch resumed from the bookmark's version, then re-listed after 410
    assert script.watch_rvs == ["10", "20", "50"]
    assert w.restarts == ["expired"]
    assert set(state.nodes) == {"c"}
    assert state.synced["nodes"]


def test_errors_back_off_and_recover() -> None:
    state = ClusterState()
    stop = threading.Event()
    script = Script(
        lists=[ConnectionError("refused"), ([], "1"), ([T.pod("p", node_name="n", gpus=2)], "5")],
        watches=[
            [{"type": "ADDED", "object": _rv(T.pod("q", node_name="n", gpus=1), "2")}],
            OSError("connection reset"),
        ],
        stop=stop,
    )
    w = _run(script, pod_handlers(state))
    assert w.restarts == ["error", "error"]
    assert set(state.pods) == {"default/p"} and state.used_gpus == {"n": 2}


def test_plan_configmap_events() -> None:
    state = ClusterState()
    stop = threading.Event()
    good = T.plan({"default.chat": [("n", "H100", 1)]}).to_json()
    cm = {"kind": "ConfigMap", "metadata": {"name": "joulepool-plan", "resourceVersion": "3"},
          "data": {"plan.json": good}}
    bad = {"kind": "ConfigMap", "metadata": {"name": "joulepool-plan", "resourceVersion": "4"},
           "data": {"plan.json": "{broken"}}
    script = Script(lists=[([], "1")], watches=[[{"type": "ADDED", "object": cm},
                                                 {"type": "MODIFIED", "object": bad}]], stop=stop)
    _run(script, plan_handlers(state))
    assert state.synced["plan"]
    assert state.plan is not None and "default.chat" in state.plan.pools  # bad update ignored
    assert "keeping the previous" in state.plan_error
