"""Operator chaos run: seeded API faults and user actions, then an oracle: no lost update.

One run (:func:`run_chaos`): the real operator against the kmock emulator
(:mod:`operator_fixtures`), a seeded sequence of user actions through a fault-free
client, and meanwhile seeded faults on the operator's own requests (kopf's and the
planning loop's, told apart by their User-Agent):

* answered with an error before anything is applied: 409, 422 (writes only), 429 with
  ``Retry-After``, 500, 503;
* applied, then answered 500 (the client cannot know the write happened);
* slow (answered after 0.05-0.4 s);
* watch drops: every watch of a resource ended with ``410 Gone``, sometimes with a
  Deployment deleted, or a Node deleted, while the watch was down (no DELETED event).

User actions: create pools, change their demand, delete pools, add and remove GPU nodes,
scale a Deployment by hand. The cluster always has room for every pool, so the final
plan is feasible and determined by the final objects.

Then the faults stop and the run waits (bounded) until the cluster converges to what
the oracle says it must be; every pool, Deployment or plan entry still wrong at the
deadline is a lost update:

* every pool that exists has a status for its current generation
  (``observedGeneration``), ``Planned=True``, and the replicas a fresh solve of the
  final objects gives it (``joulepool.pooling.plan_pools``, the same pure planner);
* the published plan holds exactly the existing pools and only existing nodes;
* the Deployments are exactly one per (pool, mode, node) of the published plan, with
  its instances as replicas; none left for deleted pools;
* every deleted pool is gone (no finalizer left behind).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import operator_fixtures as fx

from joulepool.api.models import EnergyPolicySpec
from joulepool.operator.resources import deployment_name, node_from_body, parse_pool
from joulepool.pooling import plan_pools

WRITES = ("POST", "PATCH", "PUT", "DELETE")
NODES = ["gpu-a", "gpu-b", "gpu-c", "gpu-d"]  # always there: room for every pool
EXTRA_NODES = ["gpu-x", "gpu-y"]  # come and go


@dataclass
class Chaos:
    """Seeded fault decisions for the emulator (``FaultyEmulator.chaos``)."""

    rng: random.Random
    rate: float = 0.15
    active: bool = True
    injected: Counter[str] = field(default_factory=Counter)

    def verdict(self, request: Any) -> tuple[str, Any] | None:
        agent = str(request.headers.get("User-Agent", ""))
        if not self.active or not (agent.startswith("kopf") or agent == "joulepool-operator"):
            return None
        if request.params.get("watch") in ("true", "1") or self.rng.random() >= self.rate:
            return None
        method = str(request.method).upper().rsplit(".", 1)[-1]
        write = method in WRITES
        kinds = ["500", "503", "429", "slow"] + (["409", "422", "after"] if write else [])
        kind = self.rng.choice(kinds)
        self.injected[kind] += 1
        if kind == "slow":
            return ("slow", self.rng.uniform(0.05, 0.4))
        if kind == "after":
            return ("after", 500)
        return ("error", int(kind))


@dataclass
class ChaosResult:
    seed: int
    actions: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    watch_drops: int = 0
    gap_deletions: int = 0
    lost_updates: list[str] = field(default_factory=list)
    seconds_to_converge: float | None = None

    @property
    def faults_injected(self) -> int:
        return sum(self.faults.values())


OPERATOR_SETTINGS: dict[str, Any] = {
    "debounce_seconds": 0.05, "max_delay_seconds": 0.5,
    "retry_delays": (0.02, 0.05, 0.1), "resync_after_error_seconds": 0.1,
    "max_resync_after_error_seconds": 1.0, "release_retry_seconds": 1.0,
    "listing_check_seconds": 2.0, "watch_client_timeout": 5.0,
}


async def run_chaos(seed: int, actions: int = 20, rate: float = 0.15,
                    converge_timeout: float = 60.0) -> ChaosResult:
    """One seeded run; see the module docstring."""
    rng = random.Random(seed)
    result = ChaosResult(seed)
    async with fx.emulator() as server, aiohttp.ClientSession(
            base_url=str(server.url)) as session:
        c = fx.Cluster(server, session)
        for name in NODES:
            await c.create(fx.node(name))
        chaos = Chaos(random.Random(seed * 7919 + 1), rate=rate)
        server.chaos = chaos
        async with fx.operator_running(server, **OPERATOR_SETTINGS):
            world = World(c, rng, result)
            for _ in range(actions):
                await world.step()
                await asyncio.sleep(rng.uniform(0.0, 0.3))
            chaos.active = False
            result.faults = chaos.injected
            start = time.monotonic()
            problems = await converge(c, world, converge_timeout)
            if not problems:
                result.seconds_to_converge = time.monotonic() - start
            result.lost_updates = problems
    return result


class World:
    """The user's side: seeded actions, and what exists as far as the user knows."""

    def __init__(self, c: fx.Cluster, rng: random.Random, result: ChaosResult) -> None:
        self.c, self.rng, self.result = c, rng, result
        self.pools: set[str] = set()
        self.deleted: set[str] = set()
        self.extra: set[str] = set()
        self.counter = 0

    async def step(self) -> None:
        self.result.actions += 1
        choices = ["create", "demand", "demand", "scale", "drop", "node"]
        if self.pools:
            choices.append("delete")
        action = self.rng.choice(choices if self.pools else ["create"])
        await getattr(self, f"_{action}")()

    async def _create(self) -> None:
        self.counter += 1
        name = f"p{self.counter}"
        await self.c.create(fx.pool(name, rps=self.rng.choice([2.0, 4.0, 8.0, 20.0])))
        self.pools.add(name)
        self.deleted.discard(name)

    async def _demand(self) -> None:
        if not self.pools:
            return await self._create()
        name = self.rng.choice(sorted(self.pools))
        rps = self.rng.choice([2.0, 4.0, 8.0, 20.0, 30.0])
        await self.c.patch(f"/apis/{fx.API}/namespaces/default/inferencepools/{name}",
                           {"spec": {"demand": {"requestsPerSecond": rps}}})

    async def _delete(self) -> None:
        name = self.rng.choice(sorted(self.pools))
        await self.c.delete(f"/apis/{fx.API}/namespaces/default/inferencepools/{name}")
        self.pools.discard(name)
        self.deleted.add(name)

    async def _scale(self) -> None:
        deps = await self.c.deployments()
        if deps:
            name = self.rng.choice(sorted(deps))
            await self.c.patch(f"/apis/apps/v1/namespaces/default/deployments/{name}",
                               {"spec": {"replicas": self.rng.randint(0, 9)}})

    async def _node(self) -> None:
        name = self.rng.choice(EXTRA_NODES)
        if name in self.extra:
            await self.c.delete(f"/api/v1/nodes/{name}")
            self.extra.discard(name)
        else:
            await self.c.create(fx.node(name))
            self.extra.add(name)

    async def _drop(self) -> None:
        """410 Gone on a resource's watches; sometimes with a deletion in the gap."""
        server = self.c.server
        plural = self.rng.choice(["deployments", "nodes", "inferencepools"])
        if plural == "deployments" and self.rng.random() < 0.6:
            deps = sorted(await self.c.deployments())
            if deps:
                server.vanish("deployments", "default", self.rng.choice(deps))
                self.result.gap_deletions += 1
        if plural == "nodes" and self.extra and self.rng.random() < 0.6:
            name = self.rng.choice(sorted(self.extra))
            server.vanish("nodes", None, name)
            self.extra.discard(name)
            self.result.gap_deletions += 1
        self.result.watch_drops += await server.expire_watches(plural)


async def converge(c: fx.Cluster, world: World, timeout: float) -> list[str]:
    """Wait until the oracle holds; what still differs at the deadline (empty: none)."""
    deadline = time.monotonic() + timeout
    problems: list[str] = []
    while time.monotonic() < deadline:
        problems = await oracle(c, world)
        if not problems:
            return []
        await asyncio.sleep(0.25)
    return problems


async def oracle(c: fx.Cluster, world: World) -> list[str]:
    """Everything that differs from the final state the user asked for."""
    problems: list[str] = []
    items = {p["metadata"]["name"]: p for p in await c.items(
        f"/apis/{fx.API}/namespaces/default/inferencepools")}
    nodes = {n["metadata"]["name"]: n for n in await c.items("/api/v1/nodes")}
    for name in sorted(world.deleted & set(items)):
        problems.append(f"pool {name}: deleted but still there "
                        f"(finalizers {items[name]['metadata'].get('finalizers')})")
    for name in sorted(world.pools - set(items)):
        problems.append(f"pool {name}: missing")
    expected = _fresh_plan([items[n] for n in sorted(world.pools & set(items))], nodes)
    for name in sorted(world.pools & set(items)):
        problems += _pool_problems(items[name], expected.get(f"default.{name}"))
    _, doc = await c.plan()
    if doc is None:
        return [*problems, "no plan published"]
    if set(doc.pools) != {f"default.{n}" for n in world.pools}:
        problems.append(f"plan pools {sorted(doc.pools)} != {sorted(world.pools)}")
    if set(doc.nodes) - set(nodes):
        problems.append(f"plan uses deleted nodes {sorted(set(doc.nodes) - set(nodes))}")
    want = {deployment_name(p.name, a.mode, a.node): a.instances
            for p in doc.pools.values() for a in p.assignments if a.instances > 0}
    have = {n: d["spec"]["replicas"] for n, d in (await c.deployments()).items()}
    if have != want:
        problems.append(f"deployments {have} != plan {want}")
    return problems


def _fresh_plan(pools: list[dict[str, Any]], nodes: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Replicas per pool key that a fresh solve of the final objects gives."""
    parsed = [e.pool for e in map(parse_pool, pools) if e.pool is not None]
    infos = [i for i in map(node_from_body, nodes.values()) if i is not None]
    plan = plan_pools(parsed, infos, EnergyPolicySpec(), partial=True)
    return {k: o.replicas for k, o in plan.outcomes.items()}


def _pool_problems(obj: dict[str, Any], replicas: int | None) -> list[str]:
    name, status = obj["metadata"]["name"], obj.get("status") or {}
    planned = fx.condition(obj, "Planned")
    out = []
    if status.get("observedGeneration") != obj["metadata"].get("generation"):
        out.append(f"pool {name}: status for generation {status.get('observedGeneration')}, "
                   f"spec is {obj['metadata'].get('generation')}")
    if planned is None or planned["status"] != "True":
        out.append(f"pool {name}: Planned={planned and planned['status']}")
    if replicas is not None and status.get("replicas") != replicas:
        out.append(f"pool {name}: {status.get('replicas')} replicas, a fresh plan gives "
                   f"{replicas}")
    return out


def summary(results: list[ChaosResult]) -> dict[str, Any]:
    faults: Counter[str] = Counter()
    for r in results:
        faults.update(r.faults)
    return {
        "runs": len(results),
        "actions": sum(r.actions for r in results),
        "faults_injected": sum(faults.values()),
        "faults_by_kind": dict(sorted(faults.items())),
        "watch_drops": sum(r.watch_drops for r in results),
        "deletions_in_watch_gaps": sum(r.gap_deletions for r in results),
        "runs_with_lost_updates": sum(1 for r in results if r.lost_updates),
        "lost_updates": sum(len(r.lost_updates) for r in results),
    }
