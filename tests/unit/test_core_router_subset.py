"""core.router: picking within a gateway's subset, moving and cancelling ledger entries,
and saturation (the picker's 429 rule)."""

from __future__ import annotations

import pytest

from joulepool.core.router import Endpoint, NoEndpoints, PoolRouter, RouterConfig
from joulepool.core.routing import EndpointModel

EFFICIENT, FAST, THIRD = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


def _pool(routing: str = "joulesched", waiting: float = 0.0) -> PoolRouter:
    p = PoolRouter("ns.p", RouterConfig(routing=routing))
    p.set_endpoints([
        Endpoint(EFFICIENT, EndpointModel.constant(0.1, 100.0), waiting=waiting),
        Endpoint(FAST, EndpointModel.constant(0.5, 1000.0), waiting=waiting),
        Endpoint(THIRD, EndpointModel.constant(0.3, 500.0), waiting=waiting),
    ])
    return p


@pytest.mark.parametrize("routing", ["joulesched", "least-loaded", "round-robin"])
def test_subset_limits_pick_and_fallbacks(routing: str) -> None:
    p = _pool(routing)
    seen = set()
    for i in range(6):
        d = p.decide(100, 0, None, 60.0, now=float(i), subset={FAST, THIRD})
        assert {d.endpoint, *d.fallbacks} <= {FAST, THIRD}
        assert len(d.fallbacks) == 1
        seen.add(d.endpoint)
    assert EFFICIENT not in seen
    if routing == "round-robin":
        assert seen == {FAST, THIRD}


def test_subset_without_pool_endpoint_is_no_endpoints() -> None:
    p = _pool()
    with pytest.raises(NoEndpoints):
        p.decide(100, 0, None, 60.0, now=0.0, subset={"10.9.9.9:1"})
    with pytest.raises(NoEndpoints):
        p.decide(100, 0, None, 60.0, now=0.0, subset=set())
    assert sum(len(e.ledger) for e in p.endpoints) == 0


def test_move_and_cancel_ledger_entries() -> None:
    p = _pool()
    d = p.decide(100, 0, None, 60.0, now=0.0)
    other = d.fallbacks[0]
    assert p.move_routed(d.request_id, d.endpoint, other)
    assert len(p.endpoints[p.index[d.endpoint]].ledger) == 0
    assert p.endpoints[p.index[other]].ledger_tokens == 100
    assert not p.move_routed(d.request_id, d.endpoint, other)  # no longer there
    assert p.release(other, d.request_id)
    assert not p.release(other, d.request_id)
    assert p.queue_tokens().max() == 0.0
    assert p.window.rate(0.0) is None  # cancelling is not a completion


def test_saturated_when_every_eligible_endpoint_queues() -> None:
    assert not _pool(waiting=0.0).saturated()
    p = _pool(waiting=2.0)
    assert p.saturated() and p.saturated({FAST})
    p.apply_scrape(FAST, 0.0, 4.0, now=0.0)
    assert not p.saturated() and not p.saturated({FAST})
    assert p.saturated({EFFICIENT, THIRD})
