"""Shared instances end to end in production: InferencePools of one model, served under the
same names in one namespace, share an instance at low load (pooling -> the plan document's
``sharedWith``), the routing service puts the host pool's pod in the guest pool, and the
node agent holds that pod to the tighter of the two SLOs."""

from __future__ import annotations

import math
from typing import Any

import pytest

from joulepool.api.models import EnergyPolicySpec, InferencePool
from joulepool.api.plan import PlanDocument, PlannedInstance, PlannedPool, PlannedSLO
from joulepool.core.classes import Tier
from joulepool.core.problem import node_from_label
from joulepool.fakes.gpus import SimulatedBackend, SimulatedGPUs
from joulepool.kube import testing as T
from joulepool.kube.pools import Router, RouterSettings
from joulepool.kube.state import ClusterState
from joulepool.nodeagent.agent import AgentConfig, NodeAgent
from joulepool.nodeagent.signals import EngineReading, StaticSignalSource
from joulepool.operator.resources import PlanView, parse_pool, pool_conditions
from joulepool.pooling import outcomes_from_document, plan_pools


def pool(name: str, namespace: str = "default", model: str = "llama-3.1-8b",
         rps: float = 0.05, tpot: float = 0.1, **spec: Any) -> InferencePool:
    return InferencePool.model_validate({
        "apiVersion": "joulepool.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"model": model, "slo": {"ttftSeconds": 1.0, "tpotSeconds": tpot},
                 "demand": {"requestsPerSecond": rps, "meanInputTokens": 500,
                            "meanOutputTokens": 100},
                 "template": {"spec": {"containers": [{"name": "e", "image": "i"}]}},
                 **spec}})


ONE_H100 = [node_from_label("h0", "eu-west", "H100", 1)]


def test_two_small_pools_of_one_model_share_the_one_gpu() -> None:
    chat, rag = pool("chat"), pool("rag", tpot=0.05)
    plan = plan_pools([chat, rag], ONE_H100, EnergyPolicySpec())
    assert plan.result.feasible  # one instance for each pool would need two GPUs
    doc = plan.document
    (host,) = [k for k, p in doc.pools.items() if p.assignments]
    guest = ({"default.chat", "default.rag"} - {host}).pop()
    (inst,) = doc.pools[host].assignments
    assert (inst.node, inst.instances, inst.shared_with) == ("h0", 1, [guest])
    assert doc.pools[guest].assignments == [] and doc.pools[guest].replicas == 0
    assert plan.outcomes[guest].planned
    assert f"also served on instances of {host}" in plan.outcomes[guest].message
    # the document round-trips (operator -> ConfigMap -> router and node agents)
    again = PlanDocument.from_json(doc.to_json())
    assert again.pools[host].assignments[0].shared_with == [guest]
    # the shared pod meets the tighter TPOT of the two pools
    assert again.serving_slo(host, "h0") == (1.0, 0.05)
    assert again.serving_slo(host, "other-node") == (1.0, doc.pools[host].slo.tpot_seconds)


def test_a_shared_instances_energy_per_token_counts_each_pools_own_tokens() -> None:
    # the guest's requests produce 4x the host's tokens: the instance's J/token is its
    # power over every served pool's tokens, each at its own output length
    chat, rag = pool("chat", rps=0.1), pool("rag", rps=0.02)
    rag.spec.demand.mean_output_tokens = 400
    plan = plan_pools([chat, rag], ONE_H100, EnergyPolicySpec())
    (a,) = plan.result.assignments
    assert set(a.serves) == {"default.chat", "default.rag"}
    tokens = a.rps_of("default.chat") * 100 + a.rps_of("default.rag") * 400
    outcome = plan.outcomes[a.cls]
    assert outcome.expected_power_w == pytest.approx(a.power_w)
    assert outcome.joules_per_token == pytest.approx(a.power_w / tokens)


def test_pools_of_other_namespaces_or_models_never_share() -> None:
    for other in (pool("rag", namespace="team-b"), pool("rag", model="llama-3.1-70b"),
                  pool("rag", servedModelNames=["rag-model"])):
        plan = plan_pools([pool("chat"), other], ONE_H100, EnergyPolicySpec(), partial=True)
        assert all(not a.shared_with for p in plan.document.pools.values()
                   for a in p.assignments)
        assert not plan.result.feasible  # two pools, one GPU, nothing shared


def test_the_guest_pool_routes_to_the_host_pools_pod() -> None:
    doc = plan_pools([pool("chat"), pool("rag")], ONE_H100, EnergyPolicySpec()).document
    (host,) = [k for k, p in doc.pools.items() if p.assignments]
    guest = ({"default.chat", "default.rag"} - {host}).pop()
    s = ClusterState()
    s.replace_nodes([T.node("h0", "H100", gpus=1)])
    s.replace_pods([T.pod("a", node_name="h0", ready=True, ip="10.0.0.1", pool=host,
                          mode="1xH100")])
    s.set_plan(doc)
    r = Router(RouterSettings(), s)
    assert [e.address for e in r.pool(host).endpoints] == ["10.0.0.1:8000"]
    assert [e.address for e in r.pool(guest).endpoints] == ["10.0.0.1:8000"]
    # the host's pod changes: the guest pool follows (it borrows that pod); a second pod
    # of the one planned instance (a rollout's surge) is not a second shared instance
    s.upsert_pod(T.pod("b", node_name="h0", ready=True, ip="10.0.0.2", pool=host,
                       mode="1xH100"))
    assert [e.address for e in r.pool(host).endpoints] == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert [e.address for e in r.pool(guest).endpoints] == ["10.0.0.1:8000"]
    s.delete_pod("default/a")
    assert [e.address for e in r.pool(guest).endpoints] == ["10.0.0.2:8000"]
    # a pod of the host on another mode is not one of the shared instances
    s.upsert_pod(T.pod("c", node_name="h0", ready=True, ip="10.0.0.3", pool=host,
                       mode="2xH100"))
    assert "10.0.0.3:8000" not in [e.address for e in r.pool(guest).endpoints]
    assert "10.0.0.3:8000" in [e.address for e in r.pool(host).endpoints]


def test_a_pool_served_only_on_shared_instances_is_ready_when_its_host_is() -> None:
    plan = plan_pools([pool("chat"), pool("rag")], ONE_H100, EnergyPolicySpec())
    (host,) = [k for k, p in plan.document.pools.items() if p.assignments]
    guest = ({"default.chat", "default.rag"} - {host}).pop()
    # the operator after a restart reads the same outcomes back from the document
    for outcomes in (plan.outcomes, outcomes_from_document(plan.document)):
        assert (outcomes[guest].hosts, outcomes[guest].shared_instances) == ((host,), 1)
        view = PlanView(in_force=plan.document, in_force_outcomes=outcomes,
                        in_force_feasible=True, latest_feasible=True,
                        latest_outcomes=outcomes, latest_binding="",
                        latest_pools=frozenset(outcomes))
        entry = parse_pool(pool(guest.split(".", 1)[1]).model_dump(by_alias=True,
                                                                   mode="json"))
        ready = {c["type"]: (c["status"], c["reason"], c["message"])
                 for c in pool_conditions(entry, view, 0, True, shared_ready=1)}
        assert ready["Ready"][:2] == ("True", "ReplicasReady")
        assert f"served on 1 shared instance(s) of {host}" in ready["Ready"][2]
        ready = {c["type"]: (c["status"], c["reason"])
                 for c in pool_conditions(entry, view, 0, True, shared_ready=0)}
        assert ready["Ready"] == ("False", "ReplicasNotReady")


def _planned(name: str, *assignments: PlannedInstance) -> PlannedPool:
    return PlannedPool(namespace="default", name=name, model="llama-3.1-8b", tier="standard",
                       slo=PlannedSLO(ttftSeconds=1.0, tpotSeconds=0.1),
                       replicas=sum(a.instances for a in assignments),
                       assignments=list(assignments))


def _instances(n: int, *guests: str, node: str = "h0") -> PlannedInstance:
    return PlannedInstance(node=node, site="eu-west", product="H100", mode="1xH100",
                           instances=n, gpus=n, gpusPerInstance=1, sharedWith=list(guests))


def _two_ready_pods_on_one_node(doc: PlanDocument, host: str) -> tuple[ClusterState, Router]:
    """A router over ``doc`` with pods a (10.0.0.1) and b (10.0.0.2) of pool ``host``,
    ready, on one 2-GPU H100 node."""
    s = ClusterState()
    s.replace_nodes([T.node("h0", "H100", gpus=2)])
    s.replace_pods([T.pod(n, node_name="h0", ready=True, ip=ip, pool=host, mode="1xH100")
                    for n, ip in (("a", "10.0.0.1"), ("b", "10.0.0.2"))])
    s.set_plan(doc)
    return s, Router(RouterSettings(), s)


def test_an_unshared_pod_of_the_same_node_and_mode_is_not_the_guests() -> None:
    """The host pool has an instance of its own and one shared with rag on one node and
    mode: rag gets exactly one of the host's pods there, whichever are ready."""
    doc = PlanDocument(pools={
        "default.chat": _planned("chat", _instances(1), _instances(1, "default.rag")),
        "default.rag": _planned("rag")})
    s, r = _two_ready_pods_on_one_node(doc, "default.chat")

    def addresses(key: str) -> list[str]:
        return [e.address for e in r.pool(key).endpoints]

    assert addresses("default.chat") == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert addresses("default.rag") == ["10.0.0.1:8000"]  # not b, chat's own instance
    # a shared pod that is not ready is replaced by the host's other pod there
    s.upsert_pod(T.pod("a", node_name="h0", ready=False, ip="10.0.0.1", pool="default.chat",
                       mode="1xH100"))
    assert addresses("default.rag") == ["10.0.0.2:8000"]
    assert addresses("default.chat") == ["10.0.0.2:8000"]


def test_each_guest_gets_the_pods_of_its_own_shared_instances() -> None:
    """Two instances of one node and mode, each shared with another pool: each guest gets
    one pod, not the same one; a pod beyond the planned instances serves the host alone."""
    chat = _planned("chat", _instances(1, "default.rag"), _instances(1, "default.qa"),
                    _instances(1, "default.rag", node="h1"))
    pods = [("default/c", "h0", "1xH100"), ("default/a", "h0", "1xH100"),
            ("default/b", "h0", "1xH100"), ("default/d", "h0", "2xH100"),
            ("default/e", "h1", "1xH100")]
    assert chat.guests_by_pod(pods) == {
        "default/a": ("default.rag",), "default/b": ("default.qa",),
        "default/e": ("default.rag",)}
    assert _planned("rag").guests_by_pod(pods) == {}


def _chat_shares_pod_a_with_rag() -> tuple[ClusterState, Router]:
    """chat: pod a (10.0.0.1) shared with rag, and its own pod b (10.0.0.2), on h0."""
    doc = PlanDocument(pools={
        "default.chat": _planned("chat", _instances(1), _instances(1, "default.rag")),
        "default.rag": _planned("rag")})
    s, r = _two_ready_pods_on_one_node(doc, "default.chat")
    assert [e.address for e in r.pool("default.rag").endpoints] == [A]
    return s, r


A, B = "10.0.0.1:8000", "10.0.0.2:8000"


def _route(r: Router, key: str, to: str, output: float, prompt: float = 100.0,
           now: float = 0.0) -> str:
    from joulepool.core.classes import Tier

    return r.pool(key).decide(output, prompt, Tier.INTERACTIVE, None, now,
                              subset=frozenset({to})).request_id


def test_a_shared_pods_energy_drift_is_read_at_the_batch_of_every_pools_requests() -> None:
    """A completion's measured joules are compared with the profile's eps at the batch
    the engine ran: rag's 5 requests on the shared pod are in that batch when chat's
    request completes (before, chat read the reference at its own 1 request)."""
    _, r = _chat_shares_pod_a_with_rag()
    chat = r.pool("default.chat")
    for _ in range(5):
        _route(r, "default.rag", A, 100.0)
    rid = _route(r, "default.chat", A, 100.0)
    endpoint = chat.endpoints[chat.index[A]]
    tokens = 2 * endpoint.eps_est.min_tokens  # past the estimator's prior
    modelled, _ = endpoint.model.at(5.0)  # the 5 others in flight on the engine
    assert modelled != endpoint.model.at(0.0)[0]
    chat.report(A, rid, tokens, True, 3.0 * modelled * tokens, 1.0)
    assert endpoint.eps_est.scale == pytest.approx(3.0)


def test_the_node_load_counts_a_shared_pods_requests_once() -> None:
    """The scheduler extender's node load: pod a's requests (from both pools) once, not
    once per pool whose row of it counts them all."""
    s, r = _chat_shares_pod_a_with_rag()
    for key, to, output in (("default.rag", A, 100.0), ("default.rag", A, 200.0),
                            ("default.chat", A, 400.0), ("default.chat", B, 800.0)):
        _route(r, key, to, output)
    table = s.table()
    load = r.node_queue_tokens(table)
    assert load[table.index["h0"]] == pytest.approx(100.0 + 200.0 + 400.0 + 800.0)


def test_a_prompt_routed_to_a_shared_pod_queues_in_every_pool_it_serves() -> None:
    """The engine has one prefill queue and one busy period: a long prompt rag routes to
    the shared pod is ahead of chat's next prompt there, in chat's row of the pod too."""
    _, r = _chat_shares_pod_a_with_rag()
    chat, rag = r.pool("default.chat"), r.pool("default.rag")
    i_chat, i_rag = chat.index[A], rag.index[A]
    _route(r, "default.rag", A, 300.0, prompt=8000.0, now=1.0)
    assert rag.prefilled_at[i_rag] > 1.0 and rag.busy_until[i_rag] > rag.prefilled_at[i_rag]
    assert chat.prefilled_at[i_chat] == rag.prefilled_at[i_rag]
    assert chat.busy_until[i_chat] == rag.busy_until[i_rag]
    # and chat's next prompt there queues behind it, in both pools' rows
    before = float(chat.prefilled_at[i_chat])
    _route(r, "default.chat", A, 10.0, prompt=100.0, now=1.0)
    assert chat.prefilled_at[i_chat] > before
    assert rag.prefilled_at[i_rag] == chat.prefilled_at[i_chat]
    assert rag.busy_until[i_rag] == chat.busy_until[i_chat]
    assert chat.prefilled_at[chat.index[B]] == -math.inf  # chat's own pod: untouched


async def test_a_shared_pod_is_scraped_once_for_every_pool_it_serves() -> None:
    """The host's pod is an endpoint of both pools; the scrape reads its page once and
    gives the reading to both pools' endpoints."""
    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from joulepool.kube.scrape import scrape_all

    reads = 0

    async def metrics(_: web.Request) -> web.Response:
        nonlocal reads
        reads += 1
        return web.Response(text="vllm:num_requests_waiting 3\nvllm:num_requests_running 5\n"
                                 "vllm:generation_tokens_total 70\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        doc = PlanDocument(pools={"default.chat": _planned("chat", _instances(1, "default.rag")),
                                  "default.rag": _planned("rag")})
        s = ClusterState()
        s.replace_nodes([T.node("h0", "H100", gpus=1)])
        s.replace_pods([T.pod("a", node_name="h0", ready=True, ip="127.0.0.1",
                              port=server.port, pool="default.chat", mode="1xH100")])
        s.set_plan(doc)
        r = Router(RouterSettings(metrics_port=0), s)
        targets = r.scrape_targets()
        assert sorted(p for p, *_ in targets) == ["default.chat", "default.rag"]
        async with aiohttp.ClientSession() as http:
            samples, failures = await scrape_all(http, targets, timeout_s=2.0, concurrency=4)
        assert (reads, failures) == (1, 0)
        assert sorted((q.pool, q.waiting, q.running) for q in samples) == [
            ("default.chat", 3.0, 5.0), ("default.rag", 3.0, 5.0)]
        for q in samples:
            assert r.apply_scrape(q.pool, q.address, q.waiting, q.running, 0.0)
    finally:
        await server.close()


class _Plan:
    """A node agent's plan source holding one document."""

    def __init__(self, doc: PlanDocument) -> None:
        self.doc = doc

    async def refresh(self) -> None:
        return None

    def current(self) -> PlanDocument:
        return self.doc


def test_the_node_agent_holds_a_shared_pod_to_the_tighter_slo() -> None:
    # the busier pool hosts the shared instance; the guest's TPOT is the tighter
    doc = plan_pools([pool("chat", rps=0.1, tpot=0.1), pool("rag", rps=0.02, tpot=0.05)],
                     ONE_H100, EnergyPolicySpec()).document
    (host,) = [k for k, p in doc.pools.items() if p.assignments]
    assert doc.pools[host].assignments[0].shared_with  # the guest shares it
    tighter = doc.serving_slo(host, "h0")
    assert tighter == (1.0, 0.05) != (1.0, doc.pools[host].slo.tpot_seconds)
    agent = NodeAgent(SimulatedBackend(SimulatedGPUs.open(None, "H100", 1, node="h0")),
                      StaticSignalSource(lambda now: []), AgentConfig(node="h0"),
                      plan=_Plan(doc))
    # the engine labelled with the host pool, and one without a label (the node's only
    # pool in the plan): both the tighter SLO
    assert agent._reading_slo(EngineReading(engine="e", pool=host)) == tighter
    assert agent._reading_slo(EngineReading(engine="e")) == tighter


def test_the_gateways_subset_names_the_host_pool_not_its_guest() -> None:
    # rag hosts one instance shared with chat (pod a) and one of its own (pod b); chat's
    # key sorts first. The gateway's subset for rag's InferencePool is rag's pods: the
    # request is rag's (its SLO, ledger and both pods), not chat's, which holds only a
    from joulepool.router.epp import choose_pool
    from joulepool.router.requests import RequestSpec

    doc = PlanDocument(pools={"default.rag": _planned("rag", _instances(1, "default.chat"),
                                                      _instances(1)),
                              "default.chat": _planned("chat")})
    _, r = _two_ready_pods_on_one_node(doc, "default.rag")
    assert [e.address for e in r.pool("default.chat").endpoints] == ["10.0.0.1:8000"]
    spec = RequestSpec(model=None, pool_header=None, input_tokens=0.0, output_tokens=None,
                       stream=False)
    rag = frozenset({"10.0.0.1:8000", "10.0.0.2:8000"})
    assert choose_pool(r, spec, rag) is r.pool("default.rag")
    assert choose_pool(r, spec, frozenset({"10.0.0.2:8000"})) is r.pool("default.rag")


def test_a_guest_counts_the_shared_instances_that_are_ready_not_its_hosts_replicas() -> None:
    """operator.resources.ready_shared_instances: chat has 2 instances of its own on h1,
    and on h0 one of its own beside 2 shared with rag (1 of them also with faq). Ready
    pods fill a node's shared instances first, as the router gives them out."""
    from joulepool.operator.resources import deployment_name, ready_shared_instances

    doc = PlanDocument(pools={
        "default.chat": _planned("chat", _instances(2, node="h1"), _instances(1),
                                 _instances(1, "default.rag"),
                                 _instances(1, "default.rag", "default.faq")),
        "default.rag": _planned("rag"), "default.faq": _planned("faq")})

    def ready(h0: int, h1: int) -> dict[tuple[str, str], int]:
        return {("default", deployment_name("chat", "1xH100", "h0")): h0,
                ("default", deployment_name("chat", "1xH100", "h1")): h1}

    # chat's 2 ready replicas on h1 serve rag nothing (counting the host's: 2)
    assert ready_shared_instances("default.rag", doc, ready(0, 2)) == 0
    assert ready_shared_instances("default.rag", doc, ready(1, 2)) == 1
    assert ready_shared_instances("default.rag", doc, ready(2, 0)) == 2
    assert ready_shared_instances("default.rag", doc, ready(3, 0)) == 2
    # faq's: the instance shared with rag too (the plan's order: rag's alone first)
    assert [ready_shared_instances("default.faq", doc, ready(n, 2)) for n in range(4)] == [
        0, 0, 1, 1]
    assert ready_shared_instances("default.chat", doc, ready(3, 2)) == 0  # none borrowed
    # the operator's Ready condition for rag: served on 2 shared instances, 1 ready
    outcomes = outcomes_from_document(doc)
    view = PlanView(in_force=doc, in_force_outcomes=outcomes, in_force_feasible=True,
                    latest_feasible=True, latest_outcomes=outcomes, latest_binding="",
                    latest_pools=frozenset(outcomes))
    entry = parse_pool(pool("rag").model_dump(by_alias=True, mode="json"))
    cond = {c["type"]: c for c in pool_conditions(
        entry, view, 0, True, shared_ready=ready_shared_instances("default.rag", doc,
                                                                   ready(1, 2)))}["Ready"]
    assert (cond["status"], cond["reason"]) == ("False", "ReplicasNotReady")
    assert "served on 2 shared instance(s) of default.chat, 1 of them ready" in cond["message"]


def test_a_pool_with_instances_of_its_own_and_shared_ones_is_ready_when_both_are() -> None:
    doc = PlanDocument(pools={
        "default.chat": _planned("chat", _instances(1, node="h1")),
        "default.faq": _planned("faq", _instances(1, "default.chat"))})
    outcomes = outcomes_from_document(doc)
    assert (outcomes["default.chat"].replicas, outcomes["default.chat"].shared_instances) == (
        1, 1)
    view = PlanView(in_force=doc, in_force_outcomes=outcomes, in_force_feasible=True,
                    latest_feasible=True, latest_outcomes=outcomes, latest_binding="",
                    latest_pools=frozenset(outcomes))
    entry = parse_pool(pool("chat").model_dump(by_alias=True, mode="json"))

    def ready(own: int, shared: int) -> tuple[str, str, str]:
        c = {c["type"]: c for c in pool_conditions(entry, view, own, True,
                                                   shared_ready=shared)}["Ready"]
        return c["status"], c["reason"], c["message"]

    assert ready(1, 1) == ("True", "ReplicasReady", "1/1 replicas ready; also served on 1 "
                           "shared instance(s) of default.faq, 1 of them ready")
    assert ready(1, 0)[:2] == ("False", "ReplicasNotReady")
    assert ready(0, 1)[:2] == ("False", "ReplicasNotReady")


def test_a_late_prompt_keeps_off_a_pod_shared_with_a_tighter_ttft() -> None:
    """rag (TTFT 1 s) has a pod of its own (c, an A100) and chat's shared H100 pod a;
    chat's TTFT is 0.3 s. A prompt late everywhere goes to c, not to the faster shared
    pod, where chat's next first tokens would wait behind its prefill
    (core.routing.overflow_rank); with chat's TTFT as loose as rag's, to a."""
    a100 = PlannedInstance(node="h1", site="eu-west", product="A100", mode="1xA100",
                           instances=1, gpus=1, gpusPerInstance=1, sharedWith=[])

    def rag_pool(chat_ttft: float) -> Any:
        chat = _planned("chat", _instances(1), _instances(1, "default.rag"))
        chat = chat.model_copy(update={"slo": PlannedSLO(ttftSeconds=chat_ttft,
                                                         tpotSeconds=0.1)})
        doc = PlanDocument(pools={"default.chat": chat,
                                  "default.rag": _planned("rag", a100)})
        s = ClusterState()
        s.replace_nodes([T.node("h0", "H100", gpus=2), T.node("h1", "A100", gpus=1)])
        s.replace_pods([T.pod(n, node_name=node, ready=True, ip=ip, pool=pool, mode=mode)
                        for n, node, ip, pool, mode in (
                            ("a", "h0", "10.0.0.1", "default.chat", "1xH100"),
                            ("b", "h0", "10.0.0.2", "default.chat", "1xH100"),
                            ("c", "h1", "10.0.0.3", "default.rag", "1xA100"))])
        s.set_plan(doc)
        r = Router(RouterSettings(), s)
        chat_pool = r.pool("default.chat")
        assert chat_pool.state.shared_ttft_s.tolist() == [math.inf, math.inf]  # a is its own
        return r.pool("default.rag")

    rag = rag_pool(0.3)
    assert [e.address for e in rag.endpoints] == [A, "10.0.0.3:8000"]
    assert rag.state.shared_ttft_s.tolist() == [0.3, math.inf]
    first = rag.state.prefill_s_per_token * 60_000.0
    assert first[0] < first[1]  # the shared H100 would give the first token sooner
    assert first[1] > 1.0  # and both are late for rag's 1 s TTFT
    assert rag.decide(30.0, 60_000.0, Tier.INTERACTIVE, None, 0.0).endpoint == "10.0.0.3:8000"
    assert rag_pool(1.0).decide(30.0, 60_000.0, Tier.INTERACTIVE, None, 0.0).endpoint == A
