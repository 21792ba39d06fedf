"""The routing service, fed the operator's plan and the cluster's pods, decides as the
simulator's ``joulesched-router`` policy does at the same traffic mix.

tests/integration/test_router_sim_parity.py checks the two paths over a static endpoints
file, where no traffic mix is known. Here the service reads a plan document whose pool
carries its planned traffic (``PlannedPool.mix``) and the pods serving it (files mode:
the plan and a Node/Pod list, as the operator and the watch would give them). Its
endpoint models are sized at that mix, so each endpoint's batch room follows the slot
load it is credited with (the per-member room), exactly as sim/production.py's router,
built with the same mean prompt and response, sizes its members. Over ``POST /v1/route``
and ``/v1/complete``, both must choose the same endpoints with the same costs and lambda.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from joulepool.api.plan import PlanDocument, PlannedInstance, PlannedMix, PlannedPool, PlannedSLO
from joulepool.core.profiles import find_profile
from joulepool.kube import testing as T
from joulepool.router import app as router_app
from joulepool.router.app import ROUTER, create_app
from joulepool.router.settings import Settings
from joulepool.sim.production import ProductionRouter

MODEL = "llama-3.1-8b"
PRODUCTS = ["H100", "H100", "A100", "A100", "A100", "L4"]
TTFT_S, TPOT_S = 0.6, 0.15
MEAN_IN, MEAN_OUT = 1400.0, 180.0
POOL = "default.chat"


def _files(tmp_path: Path) -> tuple[Path, Path]:
    """The plan (one instance per node, the pool's planned mix) and the nodes and pods."""
    assignments = [PlannedInstance(node=f"n{i}", site="eu-west", product=p, mode=f"1x{p}",
                                   instances=1, gpus=1, gpusPerInstance=1)
                   for i, p in enumerate(PRODUCTS)]
    doc = PlanDocument(version=3, pools={POOL: PlannedPool(
        namespace="default", name="chat", model=MODEL, tier="interactive",
        slo=PlannedSLO(ttftSeconds=TTFT_S, tpotSeconds=TPOT_S), replicas=len(PRODUCTS),
        assignments=assignments,
        mix=PlannedMix(requestsPerSecond=40.0, meanInputTokens=MEAN_IN,
                       meanOutputTokens=MEAN_OUT))})
    plan = tmp_path / "plan.json"
    plan.write_text(doc.to_json())
    items = [T.node(f"n{i}", p, gpus=1) for i, p in enumerate(PRODUCTS)]
    items += [T.pod(f"chat-{i}", node_name=f"n{i}", ready=True, ip=f"10.0.0.{i + 1}",
                    pool=POOL, mode=f"1x{p}") for i, p in enumerate(PRODUCTS)]
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps({"kind": "List", "items": items}))
    return plan, nodes


def _simulator_router(mix: bool) -> ProductionRouter:
    members = []
    for i, product in enumerate(PRODUCTS):
        profile = find_profile(product, MODEL, 1)
        assert profile is not None
        members.append((i, f"n{i}", profile))
    return ProductionRouter(members, ttft_s=TTFT_S, tpot_s=TPOT_S,
                            mean_tokens=(MEAN_IN, MEAN_OUT) if mix else None)


def _requests(n: int, seed: int = 5) -> list[dict[str, Any]]:
    """Long prompts with short answers and the other way round, so members credited with
    their own loads differ; a few completions after each route."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        heavy = rng.random() < 0.5
        output = int(rng.integers(10, 60) if heavy else rng.integers(200, 600))
        out.append({
            "inputTokens": int(rng.integers(2500, 4000) if heavy else rng.integers(50, 400)),
            "outputTokens": output,
            "tier": "interactive",
            "deadlineSeconds": float(TTFT_S + output * TPOT_S * rng.uniform(0.5, 1.5)),
            "complete": int(rng.integers(0, 2)),
            "met": [bool(rng.random() < 0.7) for _ in range(2)],
        })
    return out


async def test_the_planned_mix_gives_the_simulators_decisions(
        aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 1000.0}
    monkeypatch.setattr(router_app, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    plan, nodes = _files(tmp_path)
    settings = Settings(cluster=False, plan_file=plan, nodes_file=nodes,
                        scrape_interval_seconds=0, file_poll_seconds=0)
    app = create_app(settings, background=False)
    client: TestClient = await aiohttp_client(app)
    sim, unmixed = _simulator_router(mix=True), _simulator_router(mix=False)
    service_addr = {f"i{i:06d}": f"10.0.0.{i + 1}:8000" for i in range(len(PRODUCTS))}
    pending: list[tuple[int, str]] = []  # (simulator id, service requestId)
    pool = app[ROUTER].router.pool(POOL)
    differ = 0
    tpot_batches: set[tuple[float, ...]] = set()  # each member's TPOT batch, per decision
    for rid, req in enumerate(_requests(400)):
        clock["now"] += 0.01
        body = {k: req[k] for k in ("inputTokens", "outputTokens", "tier", "deadlineSeconds")}
        resp = await client.post("/v1/route", json={"pool": POOL, **body})
        assert resp.status == 200, await resp.text()
        got = await resp.json()
        args = (body["inputTokens"], body["outputTokens"], body["deadlineSeconds"], False)
        idx = sim.route(rid, *args, now=clock["now"])
        assert got["endpoint"] == f"10.0.0.{idx + 1}:8000", f"request {rid}"
        differ += unmixed.route(rid, *args, now=clock["now"]) != idx
        assert np.array_equal(pool.state.tpot_batch, sim.pool.state.tpot_batch)
        tpot_batches.add(tuple(pool.state.tpot_batch.tolist()))
        pending.append((rid, got["requestId"]))
        for k in range(min(req["complete"], len(pending))):
            sim_rid, service_id = pending.pop(0)
            address = service_addr[sim.routed[sim_rid][0]]
            met = req["met"][k]
            sim.complete(sim_rid, 100.0, met, now=clock["now"])
            unmixed.complete(sim_rid, 100.0, met, now=clock["now"])
            resp = await client.post("/v1/complete", json={
                "pool": POOL, "endpoint": address, "requestId": service_id,
                "outputTokens": 100, "deadlineMet": met})
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["lambda"] == sim.lam
    assert pool is app[ROUTER].router.pools[POOL]
    assert pool.mix_rooms and all(e.model.mix is not None for e in pool.endpoints)
    assert [e.model.batch_limit for e in pool.endpoints] == [
        e.model.batch_limit for e in sim.pool.endpoints]
    assert [len(e.ledger) for e in pool.endpoints] == [len(e.ledger) for e in sim.pool.endpoints]
    # the members' credited loads moved their TPOT batches off their pool's, and the mix
    # changed decisions: without it the simulator's router routes otherwise
    pools_own = tuple(e.model.tpot_batch_limit for e in pool.endpoints)
    assert len(tpot_batches - {pools_own}) > 1, sorted(tpot_batches)[:5]
    assert differ > 0
