"""Pool-wide counts across router replicas (core.replicas) and the PI loop that uses them
(core.router.PoolRouter.absorb_peers), with the Lease annotation codec (kube.leases)."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from joulepool.api.contract import ROUTER_COUNTS_ANNOTATION
from joulepool.core.classes import Tier
from joulepool.core.replicas import (
    Counts,
    PeerIncrements,
    ReplicaRecord,
    consensus_lambda,
    fresh_peers,
    pool_wide_totals,
)
from joulepool.core.router import Endpoint, PoolRouter, RouterConfig
from joulepool.core.routing import EndpointModel
from joulepool.kube.leases import decode_counts, encode_counts, record_of


def rec(replica: str, at: float, counts: dict[str, dict[str, Counts]],
        lambdas: dict[str, float] | None = None, ttl: float = 10.0) -> ReplicaRecord:
    return ReplicaRecord(replica, at, ttl, counts, lambdas or {})


def test_counts_increment_is_reset_aware() -> None:
    assert Counts(10, 3).since(Counts(4, 1)) == Counts(6, 2)
    # went down: the replica restarted, its whole count is new
    assert Counts(2, 1).since(Counts(40, 5)) == Counts(2, 1)
    assert Counts(1, 0) + Counts(2, 2) == Counts(3, 2)


def test_fresh_peers_leave_out_self_stale_and_far_future_records() -> None:
    records = [rec("a", 100.0, {}), rec("b", 95.0, {}), rec("c", 80.0, {}),
               rec("d", 130.0, {})]
    assert [r.replica for r in fresh_peers(records, "a", 100.0)] == ["b"]
    # within the TTL of a clock running ahead: still fresh
    assert [r.replica for r in fresh_peers(records, "a", 125.0)] == ["d"]


def test_pool_wide_totals_sum_replicas_and_tiers() -> None:
    records = [
        rec("a", 0, {"p": {"interactive": Counts(10, 2), "bulk": Counts(5, 1)}}),
        rec("b", 0, {"p": {"interactive": Counts(7, 0)}, "q": {"bulk": Counts(1, 1)}}),
    ]
    assert pool_wide_totals(records) == {"p": Counts(22, 3), "q": Counts(1, 1)}


def test_peer_increments_baseline_then_deltas_then_reset_and_forget() -> None:
    inc = PeerIncrements()
    # first sight of a replica: its history is a baseline, not new completions
    assert inc.absorb([rec("b", 0, {"p": {"interactive": Counts(100, 50)}})]) == {}
    got = inc.absorb([rec("b", 1, {"p": {"interactive": Counts(110, 53), "bulk": Counts(4, 0)},
                                   "q": {"bulk": Counts(3, 3)}})])
    # a pool (q) new in a known replica counts from zero
    assert got == {"p": Counts(14, 3), "q": Counts(3, 3)}
    assert inc.absorb([rec("b", 2, {"p": {"interactive": Counts(110, 53),
                                          "bulk": Counts(4, 0)},
                                    "q": {"bulk": Counts(3, 3)}})]) == {}
    # b restarted under the same name: its new counts are all new
    assert inc.absorb([rec("b", 3, {"p": {"interactive": Counts(2, 1)}})]) == {
        "p": Counts(2, 1)}
    # b left (stale): forgotten, so its return is a baseline again
    assert inc.absorb([]) == {}
    assert inc.absorb([rec("b", 9, {"p": {"interactive": Counts(50, 50)}})]) == {}


def test_consensus_lambda_is_the_clamped_mean_of_finite_values() -> None:
    assert consensus_lambda(10.0, [30.0], 0.0, 100.0) == pytest.approx(20.0)
    assert consensus_lambda(10.0, [], 0.0, 100.0) == 10.0
    assert consensus_lambda(10.0, [float("nan"), 20.0], 0.0, 100.0) == pytest.approx(15.0)
    assert consensus_lambda(90.0, [190.0], 0.0, 100.0) == 100.0


def _pool(name: str) -> PoolRouter:
    cfg = RouterConfig(pi_every=20, pi_period_s=1e9)
    pool = PoolRouter("ns.chat", cfg)
    pool.set_endpoints([Endpoint(f"10.0.0.{name}:8000", EndpointModel.constant(1.0, 1000.0))])
    return pool


def _exchange(pools: dict[str, PoolRouter], incs: dict[str, PeerIncrements], t: float) -> None:
    """One sync round: every replica publishes, then each absorbs the others."""
    records = [rec(k, t, {"ns.chat": dict(p.counts)}, {"ns.chat": p.pi.lam})
               for k, p in pools.items()]
    for k, p in pools.items():
        peers = fresh_peers(records, k, t)
        got = incs[k].absorb(peers).get("ns.chat", Counts())
        p.absorb_peers(got, tuple(r.lambdas["ns.chat"] for r in peers), t)


def test_replicas_converge_to_one_lambda_when_only_one_sees_misses() -> None:
    """Replica a gets every completion, 30 % of them late; b gets none. Sharing the counts
    (a few completions per round, as a 2 s Lease sync would), both lambdas rise together,
    end equal, and near the lambda of one router that saw every completion; without
    sharing, b's lambda never moves."""
    pools = {"a": _pool("1"), "b": _pool("2")}
    incs = {"a": PeerIncrements(), "b": PeerIncrements()}
    alone, single = _pool("3"), _pool("4")
    lam0 = pools["b"].pi.lam
    t = 0.0
    _exchange(pools, incs, t)  # baselines
    for i in range(600):
        t += 0.1
        missed = i % 10 < 3
        pools["a"].report("10.0.0.1:8000", None, 10, not missed, None, t, Tier.INTERACTIVE)
        single.report("10.0.0.4:8000", None, 10, not missed, None, t, Tier.INTERACTIVE)
        if i % 7 == 6:
            _exchange(pools, incs, t)
    for _ in range(3):  # the last counts reach b
        t += 1.0
        _exchange(pools, incs, t)
    a, b = pools["a"].pi.lam, pools["b"].pi.lam
    assert a > lam0 + 1000 and b > lam0 + 1000
    assert b == pytest.approx(a, rel=1e-12)
    assert a == pytest.approx(single.pi.lam, rel=0.1)
    assert pools["b"].pi_updates > 10
    assert alone.pi.lam == lam0 and alone.pi_updates == 0
    assert pools["a"].counts == {"interactive": Counts(600, 180)}


def test_peer_counts_alone_step_the_pi_loop_and_lambdas_average() -> None:
    pool = _pool("1")
    lam0 = pool.pi.lam
    pool.absorb_peers(Counts(19, 19), (), 1.0)
    assert pool.pi_updates == 0  # period not full
    pool.absorb_peers(Counts(1, 1), (), 2.0)
    assert pool.pi_updates == 1 and pool.pi.lam > lam0
    lam1 = pool.pi.lam
    pool.absorb_peers(Counts(), (lam1 + 30.0, lam1 + 60.0), 3.0)
    assert pool.pi.lam == pytest.approx(lam1 + 30.0) and pool.pi_updates == 1


def test_annotation_round_trip_and_lease_record() -> None:
    counts = {"ns.chat": {"interactive": Counts(12, 3), "bulk": Counts(4, 0)}}
    text = encode_counts(counts, {"ns.chat": 42.5, "gone": float("nan")})
    got_counts, got_lams = decode_counts(text)
    assert got_counts == counts and got_lams == {"ns.chat": 42.5}
    for bad in ('[]', '{"pools": {"p": {"interactive": {"completions": -1}}}}',
                '{"pools": {"p": {"bulk": {"misses": 1.5}}}}', '{"lambda": {"p": "x"}}'):
        with pytest.raises(ValueError):
            decode_counts(bad)
    renew = datetime(2026, 12, 7, 1, 0, 0, tzinfo=UTC)
    lease = SimpleNamespace(
        metadata=SimpleNamespace(name="router-a", annotations={ROUTER_COUNTS_ANNOTATION: text}),
        spec=SimpleNamespace(holder_identity="router-a", renew_time=renew,
                             lease_duration_seconds=10))
    r = record_of(lease)
    assert r is not None and r.replica == "router-a" and r.ttl_s == 10.0
    assert r.renewed_at == renew.timestamp() and r.counts == counts
    lease.metadata.annotations = {ROUTER_COUNTS_ANNOTATION: "{not json"}
    assert record_of(lease) is None
