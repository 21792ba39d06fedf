"""Router decisions and online learning over the cluster's pools, without HTTP."""

from __future__ import annotations

import pytest

from joulepool.core.classes import Tier
from joulepool.core.router import NoEndpoints, UnknownPool
from joulepool.kube import testing as T
from joulepool.kube.files import EndpointsFile
from joulepool.kube.pools import Router, RouterSettings
from joulepool.kube.state import ClusterState
from joulepool.router.models import CompleteRequest, RouteRequest, complete, route

EFFICIENT, FAST = "10.0.0.1:8000", "10.0.0.2:8000"


def _router(**kw: object) -> Router:
    settings = RouterSettings(**{"pi_every": 10, "lambda_initial": 10.0, **kw})  # type: ignore[arg-type]
    r = Router(settings)
    r.set_static(EndpointsFile.model_validate({"pools": {"ns.p": {
        "slo": {"ttftSeconds": 0.5, "tpotSeconds": 0.05},
        "endpoints": [
            {"address": EFFICIENT, "joulesPerToken": 0.1, "tokensPerSecond": 100},
            {"address": FAST, "joulesPerToken": 0.5, "tokensPerSecond": 1000},
        ],
    }}}))
    return r


def _req(tokens: int = 100, deadline: float | None = 2.0, tier: str | None = None
         ) -> RouteRequest:
    body: dict[str, object] = {"pool": "ns.p", "outputTokens": tokens}
    if deadline is not None:
        body["deadlineSeconds"] = deadline
    if tier is not None:
        body["tier"] = tier
    return RouteRequest.model_validate(body, strict=False)


def _done(endpoint: str, met: bool, **kw: object) -> CompleteRequest:
    return CompleteRequest.model_validate(
        {"pool": "ns.p", "endpoint": endpoint, "deadlineMet": met, "outputTokens": 100, **kw},
        strict=False,
    )


def test_light_load_goes_to_the_efficient_endpoint() -> None:
    r = _router()
    d = route(r, _req(), now=0.0)
    assert d.endpoint == EFFICIENT and d.fallbacks == [FAST]
    assert d.energy_j == pytest.approx(10.0) and d.slack_s == 0.0
    assert d.eta_s == pytest.approx(1.0) and d.lam == 10.0


def test_queue_on_the_efficient_endpoint_tips_to_the_fast_one() -> None:
    r = _router()
    chosen = [route(r, _req(), now=0.0).endpoint for _ in range(8)]
    # each routed request adds 100 tokens to the ledger: the efficient endpoint's ETA
    # grows 1 s, 2 s, 3 s ...; past the 2 s deadline lateness costs 10 J/s, and at 6 s
    # (4 s late: 10 + 40 J) it ties with the fast endpoint's 50 J of energy: equal costs
    # go to the lower ETA (core.routing.rank_endpoints), the fast endpoint's 0.1 s
    assert chosen == [EFFICIENT] * 5 + [FAST] * 3


def test_bulk_goes_to_efficient_even_when_late() -> None:
    r = _router()
    for _ in range(6):
        assert route(r, _req(tier="bulk"), now=0.0).endpoint == EFFICIENT
    # interactive now avoids the queued efficient endpoint, bulk still prefers it
    assert route(r, _req(), now=0.0).endpoint == FAST
    d = route(r, _req(tier="bulk"), now=0.0)
    assert d.endpoint == EFFICIENT and d.tier is Tier.BULK and d.slack_s > 0
    assert d.lam == pytest.approx(10.0 * 0.05)


def test_hard_deadline_option() -> None:
    soft = _router(lambda_initial=0.001)
    hard = _router(lambda_initial=0.001, hard_deadline=True)
    for r in (soft, hard):
        route(r, _req(), now=0.0)
        route(r, _req(), now=0.0)
    assert route(soft, _req(), now=0.0).endpoint == EFFICIENT  # lateness nearly free
    assert route(hard, _req(), now=0.0).endpoint == FAST


def test_completion_clears_the_ledger_by_request_id_or_oldest() -> None:
    r = _router()
    d1 = route(r, _req(), now=0.0)
    d2 = route(r, _req(), now=0.0)
    pool = r.pools["ns.p"]
    i = pool.index[EFFICIENT]
    assert d1.endpoint == d2.endpoint == EFFICIENT
    assert pool.ledger_tokens[i] == 200
    complete(r, _done(EFFICIENT, True, requestId=d2.request_id), now=1.0)
    assert list(pool.endpoints[i].ledger) == [d1.request_id]
    complete(r, _done(EFFICIENT, True), now=1.0)
    assert pool.ledger_tokens[i] == 0
    complete(r, _done(EFFICIENT, True), now=1.0)  # nothing left: harmless
    assert pool.ledger_tokens[i] == 0


def test_lost_completions_expire() -> None:
    r = _router(inflight_ttl_s=5.0)
    route(r, _req(), now=0.0)
    pool = r.pools["ns.p"]
    r.tick(4.0)
    assert pool.ledger_tokens.sum() == 100
    r.tick(5.5)
    assert pool.ledger_tokens.sum() == 0


def test_meets_lower_lambda() -> None:
    r = _router()
    r.sync()
    pool = r.pools["ns.p"]
    for k in range(30):
        complete(r, _done(EFFICIENT, met=True), now=float(k))
    assert pool.pi_updates == 3 and pool.pi.lam < 10.0
    assert pool.window.rate(30.0) == 0.0


def test_misses_raise_lambda_until_the_miss_rate_recovers() -> None:
    r = _router(pi_every=1)
    r.sync()
    pool = r.pools["ns.p"]
    for k in range(2):
        complete(r, _done(EFFICIENT, met=False), now=float(k))
    assert pool.pi_updates == 2 and pool.pi.lam > 10.0
    assert pool.window.rate(5.0) == 1.0
    # velocity-form PI: lambda peaks with the misses, then falls every on-time period
    trace = []
    for k in range(300):
        complete(r, _done(EFFICIENT, met=True), now=10.0 + k)
        trace.append(pool.pi.lam)
    peak = max(trace)
    assert trace[-1] < peak
    assert all(b <= a for a, b in zip(trace[trace.index(peak):], trace[trace.index(peak) + 1:],
                                      strict=False))


def test_time_based_pi_step() -> None:
    r = _router(pi_every=1000, pi_period_s=5.0)
    r.sync()
    pool = r.pools["ns.p"]
    complete(r, _done(FAST, met=False), now=0.0)
    r.tick(1.0)
    assert pool.pi_updates == 0
    r.tick(6.0)
    assert pool.pi_updates == 1 and pool.pi.lam > 10.0


def test_reported_joules_correct_eps() -> None:
    r = _router(eps_min_tokens=150.0)
    r.sync()
    pool = r.pools["ns.p"]
    i = pool.index[EFFICIENT]
    # measured 0.2 J/token against a modelled 0.1; after 100 tokens the profile still rules
    complete(r, _done(EFFICIENT, True, joules=20.0), now=0.0)
    assert pool.scale[i] == 1.0
    complete(r, _done(EFFICIENT, True, joules=20.0), now=1.0)
    assert pool.scale[i] == pytest.approx(2.0)
    d = route(r, _req(deadline=100.0), now=0.0)
    # twice the J/token: the efficient endpoint costs 20 J now, still below the fast one's 50
    assert d.endpoint == EFFICIENT and d.energy_j == pytest.approx(20.0)


def test_unknown_pool_and_empty_pool() -> None:
    r = _router()
    with pytest.raises(UnknownPool):
        route(r, RouteRequest.model_validate({"pool": "nope", "outputTokens": 1}), now=0.0)
    r.set_static(EndpointsFile.model_validate({"pools": {"ns.empty": {}}}))
    with pytest.raises(NoEndpoints):
        route(r, RouteRequest.model_validate({"pool": "ns.empty", "outputTokens": 1}), now=0.0)


def test_cluster_endpoints_from_ready_pods_with_profiles() -> None:
    s = ClusterState()
    s.replace_nodes([T.node("h0", "H100"), T.node("l0", "L4", gpus=4)])
    s.replace_pods([
        T.pod("a", node_name="h0", ready=True, ip="10.0.0.1"),
        T.pod("b", node_name="l0", ready=True, ip="10.0.0.2", port=9000),
        T.pod("c", node_name="l0"),  # not ready: not an endpoint
    ])
    s.set_plan(T.plan({"default.chat": [("h0", "H100", 1), ("l0", "L4", 1)]}))
    r = Router(RouterSettings(), s)
    pool = r.pool("default.chat")
    assert [e.address for e in pool.endpoints] == ["10.0.0.1:8000", "10.0.0.2:9000"]
    assert pool.endpoints[1].metrics_url == "http://10.0.0.2:9000/metrics"
    assert pool.model == "llama-3.1-8b" and pool.tpot_s == 0.05
    # the H100 endpoint is modelled with the H100 profile (faster than the L4)
    assert pool.tps[0] > pool.tps[1]
    # a pod turning ready joins without losing the others' state
    d = route(r, RouteRequest.model_validate({"pool": "default.chat", "outputTokens": 10}), 0.0)
    s.upsert_pod(T.pod("c", node_name="l0", ready=True, ip="10.0.0.3"))
    pool = r.pool("default.chat")
    assert len(pool.endpoints) == 3
    assert d.request_id in pool.endpoints[pool.index[d.endpoint]].ledger
    s.delete_pod("default/a")
    s.delete_pod("default/b")
    s.delete_pod("default/c")
    s.set_plan(None)
    with pytest.raises(UnknownPool):
        r.pool("default.chat")


def test_scrape_updates_queue_and_batch() -> None:
    r = _router()
    r.sync()
    pool = r.pools["ns.p"]
    assert r.apply_scrape("ns.p", EFFICIENT, waiting=4, running=2, now=0.0)
    assert not r.apply_scrape("ns.p", "10.9.9.9:1", 1, 1, now=0.0)
    i = pool.index[EFFICIENT]
    assert pool.queue_tokens()[i] == pytest.approx(4 * 256 + 2 * 128)
    assert route(r, _req(), now=0.0).endpoint == FAST


def test_full_kv_cache_keeps_requests_off_an_engine() -> None:
    """The efficient endpoint wins at light load until its engine reports a KV cache
    >= 95 % full; when every engine is that full, none is filtered."""
    r = _router()
    r.sync()
    pool = r.pools["ns.p"]
    assert route(r, _req(), now=0.0).endpoint == EFFICIENT
    assert r.apply_scrape("ns.p", EFFICIENT, waiting=0, running=0, now=0.0, kv_cache=0.97)
    assert pool.state.kv_cache_usage[pool.index[EFFICIENT]] == pytest.approx(0.97)
    assert route(r, _req(), now=0.0).endpoint == FAST
    r.apply_scrape("ns.p", FAST, waiting=0, running=0, now=0.0, kv_cache=0.99)
    assert route(r, _req(), now=0.0).endpoint == EFFICIENT
    r.apply_scrape("ns.p", EFFICIENT, waiting=0, running=0, now=1.0, kv_cache=None)
    assert route(r, _req(), now=1.0).endpoint == EFFICIENT  # unknown usage stays eligible
