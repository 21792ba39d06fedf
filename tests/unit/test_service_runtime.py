"""The services' runtime choices: the event loop (--event-loop) and metric label children
looked up once (they must follow a pool's removal and return)."""

from __future__ import annotations

import asyncio
import re
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from joulepool.kube.service import ServeError, loop_factory
from joulepool.router.metrics import Metrics, MetricsObserver
from joulepool.router.settings import SettingsError, load_settings


def test_event_loop_choices() -> None:
    import uvloop

    assert loop_factory("asyncio") is None  # asyncio.Runner's default loop
    for choice in ("auto", "uvloop"):
        factory = loop_factory(choice)
        assert factory is not None
        loop = factory()
        try:
            assert isinstance(loop, uvloop.Loop)
            assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
        finally:
            loop.close()


def test_event_loop_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails
    assert loop_factory("auto") is None
    with pytest.raises(ServeError, match="uvloop is not installed"):
        loop_factory("uvloop")


def test_event_loop_setting() -> None:
    assert load_settings(environ={}).event_loop == "auto"
    assert load_settings(environ={"JOULEPOOL_ROUTER_EVENT_LOOP": "asyncio"}
                         ).event_loop == "asyncio"
    with pytest.raises(SettingsError, match=re.escape(
            "EVENT_LOOP='trio': Input should be 'auto', 'uvloop' or 'asyncio'")):
        load_settings(environ={"JOULEPOOL_ROUTER_EVENT_LOOP": "trio"})


def _samples(m: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(m.render().decode())
            for s in fam.samples if s.name == name}


def test_cached_children_follow_pool_removal() -> None:
    m = Metrics()
    obs = MetricsObserver(m)
    obs.endpoints_changed("ns.chat", 3)
    obs.completed("ns.chat", missed=True, joules=None, miss_ratio=0.5)
    obs.completed("ns.chat", missed=True, joules=None, miss_ratio=0.25)
    assert _samples(m, "joulepool_router_endpoints") == {(("pool", "ns.chat"),): 3.0}
    assert _samples(m, "joulepool_router_completions_total") == {
        (("deadline", "missed"), ("pool", "ns.chat")): 2.0}
    assert _samples(m, "joulepool_router_deadline_miss_ratio") == {
        (("pool", "ns.chat"),): 0.25}
    obs.pool_removed("ns.chat")
    assert _samples(m, "joulepool_router_endpoints") == {}
    assert _samples(m, "joulepool_router_deadline_miss_ratio") == {}
    obs.endpoints_changed("ns.chat", 5)  # the pool is back: exported again
    obs.ticked("ns.chat", 0.1)
    assert _samples(m, "joulepool_router_endpoints") == {(("pool", "ns.chat"),): 5.0}
    assert _samples(m, "joulepool_router_deadline_miss_ratio") == {
        (("pool", "ns.chat"),): 0.1}
