"""Every example resource is valid twice: against the CRD's openAPIV3Schema (what
the API server checks on `kubectl apply`) and against the pydantic models (what
the operator checks)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from chartlib import CHART_DIR, ROOT, kind_gpu_nodes

from joulepool.api.load import ResourceError, load_manifests, parse_resource

EXAMPLES = sorted((ROOT / "examples").glob("*pool*.yaml"))
OURS = ["kind-chat-pool.yaml", "kind-bulk-pool.yaml"]


def _to_json_schema(node: Any) -> Any:
    """A structural OpenAPI v3.0 schema as JSON Schema, with the API server's
    strict field validation: unknown fields are errors unless the schema
    preserves them."""
    if isinstance(node, list):
        return [_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) if k in ("items", "anyOf", "allOf", "oneOf", "not") else v
           for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in node:
        out["properties"] = {k: _to_json_schema(v) for k, v in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _to_json_schema(node["additionalProperties"])
    for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(flag) is True:  # OpenAPI 3.0 form -> JSON Schema form
            out[flag] = out.pop(bound)
        elif node.get(flag) is False:
            out.pop(flag)
    if node.get("type") == "object" and "properties" in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    if node.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


def _crd_schemas() -> dict[str, dict[str, Any]]:
    out = {}
    for p in (CHART_DIR / "crds").glob("*.yaml"):
        crd = yaml.safe_load(p.read_text())
        (version,) = crd["spec"]["versions"]
        api = f"{crd['spec']['group']}/{version['name']}"
        out[f"{api}/{crd['spec']['names']['kind']}"] = _to_json_schema(
            version["schema"]["openAPIV3Schema"])
    return out


SCHEMAS = _crd_schemas()


def _resources(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _check_with_crd(obj: dict[str, Any]) -> None:
    schema = SCHEMAS[f"{obj['apiVersion']}/{obj['kind']}"]
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(obj)


def test_our_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= set(OURS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid_against_the_crd_schema(path: Path) -> None:
    resources = _resources(path)
    assert resources
    for obj in resources:
        _check_with_crd(obj)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid_against_the_models(path: Path) -> None:
    models = load_manifests(path)
    assert len(models) == len(_resources(path))


@pytest.mark.parametrize("name", OURS)
def test_kind_examples_serve_with_the_fake_engine(name: str) -> None:
    (pool,) = load_manifests(ROOT / "examples" / name)
    spec = pool.spec  # type: ignore[attr-defined]
    (container,) = spec.template["spec"]["containers"]
    assert container["image"] == "joulepool:dev"  # kind/up.sh builds and loads it
    assert container["imagePullPolicy"] == "Never"
    assert container["args"][0] == "fake-engine"
    assert container["args"][container["args"].index("--port") + 1] == str(spec.port)
    assert container["args"][container["args"].index("--model") + 1] == spec.model
    assert container["ports"] == [{"name": "http", "containerPort": spec.port}]
    # the pod runs like the chart's pods do
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec.template["spec"]["securityContext"]["runAsNonRoot"] is True


def test_kind_examples_plan_on_the_kind_cluster() -> None:
    """The planner finds room for both examples on kind/cluster.yaml's GPUs."""
    from joulepool.api.models import EnergyPolicySpec, InferencePool
    from joulepool.core.profiles import DEFAULT_PROFILES
    from joulepool.pooling import nodes_from_cluster, plan_pools

    pools = [r for n in OURS for r in load_manifests(ROOT / "examples" / n)
             if isinstance(r, InferencePool)]
    plan = plan_pools(pools, nodes_from_cluster(kind_gpu_nodes()), EnergyPolicySpec(),
                      DEFAULT_PROFILES)
    assert plan.result.feasible, plan.result.binding
    for key, planned in plan.document.pools.items():
        assert planned.replicas >= 1, key


@pytest.mark.parametrize("mutate, field", [
    (lambda o: o["spec"]["slo"].update(ttftSecond=1), "ttftSecond"),
    (lambda o: o["spec"].update(tier="batch"), "tier"),
    (lambda o: o["spec"]["demand"].update(requestsPerSecond=-1), "requestsPerSecond"),
    (lambda o: o["spec"].pop("slo"), "slo"),
])
def test_both_validators_reject_a_broken_pool(mutate: Any, field: str) -> None:
    obj = copy.deepcopy(_resources(ROOT / "examples" / OURS[0])[0])
    mutate(obj)
    with pytest.raises(jsonschema.ValidationError):
        _check_with_crd(obj)
    with pytest.raises(ResourceError, match=field):
        parse_resource(obj)
