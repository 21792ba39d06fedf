"""``InferencePool.spec.demand.inputTokenQuantiles`` on the REAL API server: the generated
CRD's rules reject a quantile given twice and token counts that fall as the quantile
rises (the API server's CEL, not only pydantic); the operator keeps a long-prompt pool
off the A100s, which prefill its mean prompt in time but not its tail, while a pool
with the same mean and no declared tail is planned on them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import k8slib
import pytest
from k8slib import ControlPlane
from operatorlib import GROUP, POOLS, VERSION, Scenario, pool_body, start_operator

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


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane) -> Iterator[k8slib.Component]:
    with k8slib.components(cluster) as procs:
        yield start_operator(procs)


def products(obj: dict[str, Any]) -> set[str]:
    return {a["gpuProduct"] for a in obj["status"]["assignments"] if a["instances"] > 0}


def test_a_long_prompt_pool_is_not_planned_on_a_mode_that_cannot_prefill_its_tail(
        cluster: ControlPlane, namespace: str, nodes: list[str],
        operator: k8slib.Component) -> None:
    s = Scenario(cluster, namespace, nodes, operator)
    try:
        s.node("a100", product="A100")
        s.node("h100", product="H100")
        s.create_pool("short", rps=2, demand=demand())
        s.create_pool("long", rps=2, demand=demand(LONG_TAIL))
        stored = s.pool("long")
        assert stored is not None
        assert stored["spec"]["demand"]["inputTokenQuantiles"] == LONG_TAIL
        assert products(s.planned("short")) == {"A100"}  # the mean prompt fits an A100
        assert products(s.planned("long")) == {"H100"}  # its tail does not
        assert not operator.forbidden_lines()
    finally:
        s.release_all()
