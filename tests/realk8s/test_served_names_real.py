"""``InferencePool.spec.servedModelNames`` on the REAL API server: the generated CRD
accepts it and rejects repeated, empty and too many names (its schema, not only
pydantic); the operator passes the names to the engine (``--served-model-name``) and
to the router (the plan)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import k8slib
import pytest
from k8slib import ControlPlane
from operatorlib import GROUP, POOLS, VERSION, Scenario, pool_body, start_operator, wait_for

from joulepool.api.plan import PLAN_CONFIGMAP, PLAN_KEY

NAMES = ["meta-llama/Llama-3.1-8B-Instruct", "chat"]


@pytest.mark.parametrize("names", [["a", "a"], [""], [f"m{i}" for i in range(17)]])
def test_the_crd_rejects_bad_served_model_names(cluster: ControlPlane, namespace: str,
                                                names: list[str]) -> None:
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as err:
        cluster.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, POOLS,
            pool_body(namespace, "bad", 1.0, servedModelNames=names))
    assert err.value.status == 422
    assert "servedModelNames" in err.value.body


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane) -> Iterator[k8slib.Component]:
    with k8slib.components(cluster) as procs:
        yield start_operator(procs)


def test_served_names_reach_the_engine_args_and_the_plan(
        cluster: ControlPlane, namespace: str, nodes: list[str],
        operator: k8slib.Component) -> None:
    s = Scenario(cluster, namespace, nodes, operator)
    try:
        s.node("h100")
        s.create_pool("chat", rps=5, servedModelNames=NAMES)
        stored = s.pool("chat")
        assert stored is not None and stored["spec"]["servedModelNames"] == NAMES
        s.planned("chat")
        deps = wait_for(s.deployments, what="the pool's Deployment")
        for d in deps.values():
            (container,) = d.spec.template.spec.containers
            assert container.args == ["--served-model-name", *NAMES]

        def planned_names() -> list[str] | None:
            cm = cluster.core.read_namespaced_config_map(PLAN_CONFIGMAP,
                                                         k8slib.RELEASE_NAMESPACE)
            pool = json.loads(cm.data[PLAN_KEY])["pools"].get(s.key("chat"))
            return pool.get("servedModelNames") if pool else None

        assert wait_for(planned_names, what="the names in the plan") == NAMES
        assert not operator.forbidden_lines()
    finally:
        s.release_all()
