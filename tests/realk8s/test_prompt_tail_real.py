"""Prompt-length tails on the REAL API server. ``spec.demand.inputTokenQuantiles``: the
generated CRD's rules reject a quantile given twice and token counts that fall as the
quantile rises (the API server's CEL, not only pydantic); the operator keeps a
long-prompt pool off the A100s, which prefill its mean prompt in time but not its tail,
while a pool with the same mean and no declared tail is planned on them. Observed: a
node agent process (the chart's node-agent ServiceAccount) writes the prompt lengths a
fake engine served into the pool's ``status.observedInputTokens``, and the operator
moves the pool off the A100s."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import k8slib
import pytest
from k8slib import ControlPlane
from operatorlib import (
    GROUP,
    POOLS,
    VERSION,
    Scenario,
    condition,
    pool_body,
    start_engine_and_agent,
    start_operator,
    wait_for,
)

LONG_TAIL = [{"quantile": 0.5, "tokens": 700}, {"quantile": 0.9, "tokens": 3000},
             {"quantile": 0.99, "tokens": 9000}]


def demand(quantiles: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"requestsPerSecond": 2, "meanInputTokens": 1000,
                         "meanOutputTokens": 200}
    if quantiles is not None:
        d["inputTokenQuantiles"] = quantiles
    return d


@pytest.mark.parametrize("quantiles,message", [
    ([{"quantile": 0.5, "tokens": 500}, {"quantile": 0.5, "tokens": 600}],
     "each quantile may be given once"),
    ([{"quantile": 0.9, "tokens": 400}, {"quantile": 0.5, "tokens": 500}],
     "tokens must not fall as the quantile rises"),
    ([{"quantile": 1.5, "tokens": 400}], "inputTokenQuantiles"),
])
def test_the_crd_rejects_inconsistent_quantiles(cluster: ControlPlane, namespace: str,
                                                quantiles: list[dict[str, Any]],
                                                message: str) -> None:
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as err:
        cluster.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, POOLS,
            pool_body(namespace, "bad", 1.0, demand=demand(quantiles)))
    assert err.value.status == 422
    assert message in err.value.body


GOOD_ENTRY = {"node": "n1", "bounds": [100, 1000, 10000], "counts": [3, 5, 9, 9],
              "updatedAt": "2026-12-07T00:00:00Z"}


@pytest.mark.parametrize("change,message", [
    ({"counts": [3, 5, 9]}, "counts needs one value per bound and the total"),
    ({"bounds": [100, 100, 10000]}, "bounds must be finite, > 0 and ascend strictly"),
    ({"bounds": [1000, 100, 10000]}, "bounds must be finite, > 0 and ascend strictly"),
    ({"bounds": [0, 100, 10000]}, "bounds must be finite, > 0 and ascend strictly"),
    ({"counts": [3, 2, 9, 9]}, "counts must be cumulative: >= 0 and not falling"),
    ({"counts": [-1, 2, 9, 9]}, "counts must be cumulative: >= 0 and not falling"),
])
def test_the_crd_rejects_an_observed_entry_the_planner_would_reject(
        cluster: ControlPlane, namespace: str, change: dict[str, Any], message: str) -> None:
    """A status write of ``observedInputTokens`` that ObservedPromptLengths' own check
    refuses is refused by the API server too (so ``joulepool plan`` on a stored pool
    never meets one), and the same entry well formed is stored."""
    from kubernetes.client.exceptions import ApiException

    from joulepool.api.models import ObservedPromptLengths

    name = f"obs-{abs(hash(message + str(change))) % 10_000}"
    cluster.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, POOLS, pool_body(namespace, name, 1.0))
    bad = {**GOOD_ENTRY, **change}
    with pytest.raises(ValueError):
        ObservedPromptLengths.model_validate(bad)
    with pytest.raises(ApiException) as err:
        cluster.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, POOLS, name,
            {"status": {"observedInputTokens": [bad]}})
    assert err.value.status == 422
    assert message in json.loads(err.value.body)["message"]
    stored = cluster.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, POOLS, name,
        {"status": {"observedInputTokens": [GOOD_ENTRY]}})
    assert stored["status"]["observedInputTokens"] == [GOOD_ENTRY]


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane) -> Iterator[k8slib.Component]:
    with k8slib.components(cluster) as procs:
        yield start_operator(procs)


def products(obj: dict[str, Any]) -> set[str]:
    return {a["gpuProduct"] for a in obj["status"]["assignments"] if a["instances"] > 0}


@pytest.mark.parametrize("share", [False, True], ids=["own-names", "shared-names"])
def test_a_long_prompt_pool_is_not_planned_on_a_mode_that_cannot_prefill_its_tail(
        cluster: ControlPlane, namespace: str, nodes: list[str],
        operator: k8slib.Component, share: bool) -> None:
    """Different served names: the pools cannot share an instance, so each is planned on
    the modes its own prompts allow. The same names: they may share (at 2 req/s each one
    H100 serving both is the cheaper plan, shared requests being priced at the batch they
    reach), and the long pool's instances still stay on the H100, never as a guest on an
    A100."""
    s = Scenario(cluster, namespace, nodes, operator)
    try:
        s.node("a100", product="A100")
        s.node("h100", product="H100")
        names = {} if share else {"short": ["short"], "long": ["long"]}
        for pool, quantiles in (("short", None), ("long", LONG_TAIL)):
            served = {"servedModelNames": names[pool]} if pool in names else {}
            s.create_pool(pool, rps=2, demand=demand(quantiles), **served)
        stored = s.pool("long")
        assert stored is not None
        assert stored["spec"]["demand"]["inputTokenQuantiles"] == LONG_TAIL
        assert products(s.planned("long")) == {"H100"}  # its tail does not fit an A100
        short = s.planned("short")
        if not share:
            assert products(short) == {"A100"}  # the mean prompt fits an A100
        else:
            assert products(short) <= {"A100", "H100"}
            ready = condition(short, "Ready")
            assert products(short) or (ready is not None and ".long" in ready["message"])
        assert not operator.forbidden_lines()
    finally:
        s.release_all()


def _send(url: str, prompt_tokens: int) -> None:
    body = json.dumps({"prompt": [1] * prompt_tokens, "max_tokens": 1}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200


def test_the_prompt_tail_a_node_agent_observes_moves_the_pool(
        scenario: Scenario, cluster: ControlPlane, tmp_path: Path) -> None:
    s = scenario
    a100 = s.node("a100", product="A100")
    s.node("h100", product="H100")
    s.create_pool("chat", rps=2, demand=demand())
    assert products(s.planned("chat")) == {"A100"}
    state = tmp_path / "gpus.json"
    engine_port = k8slib.free_port()
    url = f"http://127.0.0.1:{engine_port}"
    with k8slib.components(cluster) as procs:
        _, agent = start_engine_and_agent(
            procs, "tail", state=state, engine_port=engine_port, node=a100,
            product="A100", pool=s.key("chat"))
        # 230 short prompts and 20 of 9,000 tokens (8 %): an A100 prefills 6,667 a second
        prompts = [100] * 230 + [9000] * 20
        threads = [threading.Thread(target=lambda n=n: _send(url, n)) for n in prompts]
        for i in range(0, len(threads), 25):
            batch = threads[i:i + 25]
            for t in batch:
                t.start()
            for t in batch:
                t.join(120)

        def observed() -> dict[str, Any] | None:
            obj = s.pool("chat") or {}
            for e in (obj.get("status") or {}).get("observedInputTokens") or []:
                if e.get("node") == a100 and e["counts"][-1] >= len(prompts):
                    return dict(e)
            return None

        entry = wait_for(observed, timeout=60, what="the agent's observed prompt lengths")
        assert entry["bounds"][-1] > 9000 and entry["counts"][-1] == len(prompts)
        s.planned("chat")
        wait_for(lambda: products(s.pool("chat") or {}) == {"H100"}, timeout=60,
                 what="the pool re-planned off the A100")
        assert agent.running() and not agent.forbidden_lines()
        assert not s.op.forbidden_lines()
