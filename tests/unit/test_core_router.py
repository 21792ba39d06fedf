"""core.router: the per-pool router state machine, without HTTP or Prometheus."""

from __future__ import annotations

from typing import Any

import pytest

from joulepool.core.classes import Tier
from joulepool.core.router import (
    Endpoint,
    NoEndpoints,
    PoolRouter,
    RouteDecision,
    RouterConfig,
)
from joulepool.core.routing import EndpointModel

EFFICIENT, FAST = "10.0.0.1:8000", "10.0.0.2:8000"


class Recorder:
    """A RouterObserver that keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def endpoints_changed(self, pool: str, count: int) -> None:
        self.calls.append(("endpoints", count))

    def lambda_changed(self, pool: str, lam: float) -> None:
        self.calls.append(("lambda", lam))

    def routed(self, pool: str, decision: RouteDecision) -> None:
        self.calls.append(("routed", decision.endpoint))

    def completed(self, pool: str, missed: bool, joules: float | None, miss_ratio: float
                  ) -> None:
        self.calls.append(("completed", (missed, joules, miss_ratio)))

    def ticked(self, pool: str, miss_ratio: float) -> None:
        self.calls.append(("ticked", miss_ratio))

    def kinds(self, kind: str) -> list[Any]:
        return [v for k, v in self.calls if k == kind]


def _pool(observer: Recorder | None = None, **kw: Any) -> PoolRouter:
    cfg = RouterConfig(**{"pi_every": 10, "lambda_initial": 10.0, **kw})
    p = PoolRouter("ns.p", cfg, observer)
    p.set_endpoints([Endpoint(EFFICIENT, EndpointModel.constant(0.1, 100.0)),
                     Endpoint(FAST, EndpointModel.constant(0.5, 1000.0))])
    return p


def test_observer_sees_endpoints_routes_completions_lambda_and_ticks() -> None:
    rec = Recorder()
    p = _pool(rec)
    assert rec.kinds("lambda") == [10.0] and rec.kinds("endpoints") == [2]
    d = p.decide(100, 0, None, 2.0, now=0.0)
    assert rec.kinds("routed") == [EFFICIENT] == [d.endpoint]
    out = p.report(d.endpoint, d.request_id, 100, False, 12.5, now=1.0)
    assert rec.kinds("completed") == [(True, 12.5, 1.0)]
    assert out.endpoint_known and out.miss_ratio == 1.0
    p.tick(now=2.0)
    assert rec.kinds("ticked") == [1.0]


def test_pi_steps_every_n_completions_or_t_seconds_whichever_first() -> None:
    rec = Recorder()
    p = _pool(rec, pi_every=3, pi_period_s=10.0)
    for k in range(3):  # three misses inside 10 s: a step on the third
        p.report(EFFICIENT, None, 100, False, None, now=float(k))
    assert p.pi_updates == 1 and p.pi.lam > 10.0
    lam = p.pi.lam
    p.report(EFFICIENT, None, 100, True, None, now=3.0)
    p.tick(now=11.9)  # 9.9 s since the last step (t = 2): not yet
    assert p.pi_updates == 1
    p.tick(now=12.0)  # 10 s since the last step, one completion since: a step
    assert p.pi_updates == 2 and p.pi.lam < lam
    p.tick(now=30.0)  # no completion since: no step
    assert p.pi_updates == 2
    assert rec.kinds("lambda")[-1] == p.pi.lam


def test_ledger_entries_expire_after_the_ttl() -> None:
    p = _pool(inflight_ttl_s=5.0)
    for _ in range(3):
        p.decide(100, 0, None, 2.0, now=0.0)
    assert p.queue_tokens()[p.index[EFFICIENT]] == 300.0
    p.tick(now=4.9)
    assert p.queue_tokens()[p.index[EFFICIENT]] == 300.0
    p.tick(now=5.0)
    assert p.queue_tokens()[p.index[EFFICIENT]] == 0.0
    assert len(p.endpoints[p.index[EFFICIENT]].ledger) == 0


def test_bulk_tier_sees_lambda_times_its_factor() -> None:
    p = _pool(bulk_lambda_factor=0.2)
    assert p.decide(100, 0, Tier.BULK, 2.0, now=0.0).lam == pytest.approx(2.0)
    assert p.decide(100, 0, Tier.INTERACTIVE, 2.0, now=0.0).lam == 10.0


def test_online_eps_learning_scales_the_endpoint() -> None:
    p = _pool(eps_min_tokens=100.0)
    d = p.decide(100, 0, None, 2.0, now=0.0)
    out = p.report(d.endpoint, d.request_id, 1000, True, 200.0, now=1.0)  # 2x the model
    assert out.eps_scale == pytest.approx(2.0)
    assert p.state.eps_j_per_token[p.index[EFFICIENT]] == pytest.approx(0.2)


@pytest.mark.parametrize("routing", ["least-loaded", "round-robin"])
def test_other_routing_profiles_drive_the_same_state_machine(routing: str) -> None:
    p = _pool(routing=routing)
    picks = [p.decide(100, 0, None, 2.0, now=0.0).endpoint for _ in range(4)]
    assert picks == [EFFICIENT, FAST, EFFICIENT, FAST]
    assert p.describe(0.0)["routing"] == routing


def test_no_endpoints() -> None:
    with pytest.raises(NoEndpoints):
        PoolRouter("empty").decide(1, 0, None, None, now=0.0)
