"""The simulator's ``joulesched-router`` policy and the routing service decide alike.

Both drive core.router.PoolRouter: the simulator through sim/production.py's
adapter (``decide`` / ``report`` with the request's numbers), the service through
``POST /v1/route`` and ``/v1/complete``. Fed the same requests and outcomes, over
the same endpoints (same serving profiles, same SLOs, production defaults), they
must choose the same endpoints with the same fallbacks, costs and lambda.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from joulepool.core.profiles import find_profile
from joulepool.core.router import PoolRouter
from joulepool.router import app as router_app
from joulepool.router.app import ROUTER, create_app
from joulepool.router.settings import Settings
from joulepool.sim.production import ProductionRouter

MODEL = "llama-3.1-8b"
#: (address, product): addresses sort as the simulator's instances do
ENDPOINTS = [("10.0.0.1:8000", "H100"), ("10.0.0.2:8000", "H100"), ("10.0.0.3:8000", "A100"),
             ("10.0.0.4:8000", "A100"), ("10.0.0.5:8000", "A100"), ("10.0.0.6:8000", "L4")]
TTFT_S, TPOT_S = 0.6, 0.15
POOL = "ns.chat"


def _service_file(tmp_path: Path) -> Path:
    doc = {"pools": {POOL: {
        "model": MODEL,
        "slo": {"ttftSeconds": TTFT_S, "tpotSeconds": TPOT_S},
        "endpoints": [{"address": a, "product": p, "model": MODEL, "gpus": 1, "node": f"n{i}"}
                      for i, (a, p) in enumerate(ENDPOINTS)],
    }}}
    path = tmp_path / "endpoints.json"
    path.write_text(json.dumps(doc))
    return path


def _simulator_router() -> ProductionRouter:
    members = []
    for i, (_, product) in enumerate(ENDPOINTS):
        profile = find_profile(product, MODEL, 1)
        assert profile is not None
        members.append((i, f"n{i}", profile))
    return ProductionRouter(members, ttft_s=TTFT_S, tpot_s=TPOT_S)


def _workload(n: int, seed: int = 11) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        output = int(rng.integers(10, 600))
        out.append({
            "inputTokens": int(rng.integers(10, 2000)),
            "outputTokens": output,
            "tier": "bulk" if rng.random() < 0.2 else "interactive",
            # tight deadlines, so lateness, misses and the PI loop all come into play
            "deadlineSeconds": float(TTFT_S + output * TPOT_S * rng.uniform(0.2, 1.5)),
            "complete": int(rng.integers(0, 3)),  # completions reported after this route
            "met": [bool(rng.random() < 0.6) for _ in range(3)],
        })
    return out


async def test_same_requests_same_decisions(aiohttp_client: Any, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # one clock for both: the service reads time.monotonic(), the simulator is told
    # (the router's prefill clock makes decisions depend on the time between requests)
    clock = {"now": 1000.0}
    monkeypatch.setattr(router_app, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    settings = Settings(cluster=False, endpoints_file=_service_file(tmp_path),
                        scrape_interval_seconds=0, file_poll_seconds=0)
    app = create_app(settings, background=False)
    client: TestClient = await aiohttp_client(app)
    sim = _simulator_router()
    address_of = {idx: a for a, idx in sim.instance_of.items()}
    service_addr = {f"i{i:06d}": a for i, (a, _) in enumerate(ENDPOINTS)}
    pending_service: list[str] = []  # requestIds routed and not yet completed
    pending_sim: list[int] = []
    lambdas = set()
    decisions: list[Any] = []  # what the simulator's decide() returned, in order
    decide = sim.pool.decide

    def recording_decide(*args: Any, **kw: Any) -> Any:
        decisions.append(decide(*args, **kw))
        return decisions[-1]

    sim.pool.decide = recording_decide  # type: ignore[method-assign]
    for rid, req in enumerate(_workload(300)):
        clock["now"] += 0.004  # 250 requests/s
        body = {k: req[k] for k in ("inputTokens", "outputTokens", "tier", "deadlineSeconds")}
        resp = await client.post("/v1/route", json={"pool": POOL, **body})
        assert resp.status == 200, await resp.text()
        got = await resp.json()
        idx = sim.route(rid, body["inputTokens"], body["outputTokens"], body["deadlineSeconds"],
                        body["tier"] == "bulk", now=clock["now"])
        assert got["endpoint"] == service_addr[address_of[idx]], f"request {rid}"
        mine = decisions[-1]
        assert got["fallbacks"] == [service_addr[a] for a in mine.fallbacks]
        assert got["cost"] == {"energyJoules": mine.energy_j, "slackSeconds": mine.slack_s,
                               "lambda": mine.lam, "etaSeconds": mine.eta_s,
                               "total": mine.cost}
        assert got["tier"] == str(mine.tier) and got["deadlineSeconds"] == mine.deadline_s
        lambdas.add(sim.lam)
        pending_service.append(got["requestId"])
        pending_sim.append(rid)
        for k in range(min(req["complete"], len(pending_sim))):
            met = req["met"][k]
            sim_rid = pending_sim.pop(0)
            address = service_addr[sim.routed[sim_rid][0]]
            sim.complete(sim_rid, 100.0, met, now=clock["now"])
            resp = await client.post("/v1/complete", json={
                "pool": POOL, "endpoint": address, "requestId": pending_service.pop(0),
                "outputTokens": 100, "deadlineMet": met})
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["lambda"] == sim.lam
    service_pool = app[ROUTER].router.pools[POOL]
    assert type(service_pool) is type(sim.pool) is PoolRouter
    assert service_pool.pi_updates == sim.pool.pi_updates >= 2
    assert len(lambdas) >= 3  # lambda moved, and both followed it alike
    # the same ledgers (tokens routed and not completed) and queue estimates
    assert [len(e.ledger) for e in service_pool.endpoints] == [
        len(e.ledger) for e in sim.pool.endpoints]
    assert np.array_equal(service_pool.eta_queue_tokens(), sim.pool.eta_queue_tokens())
    # the marginal-energy rule consolidates (joining a running batch costs a fraction of
    # waking another endpoint) until the first-token guard sees the endpoint's prefill
    # queue pass the TTFT SLO: the work spills over to more than one endpoint, and the
    # queue estimates compared above are not all zero
    assert sum(1 for e in service_pool.endpoints if e.ledger) >= 2
    assert np.array_equal(service_pool.prefilled_at, sim.pool.prefilled_at)
    assert float(np.max(service_pool.eta_queue_tokens())) > 0.0
