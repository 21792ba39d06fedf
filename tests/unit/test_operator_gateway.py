"""operator.gateway: the GIE InferencePool built for a joulepool pool is valid against
GIE's v1 schema (tests/data/gie), selects the pool's pods on the router's serving port,
and is what examples/gateway-httproute.yaml routes to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from joulepool.api.contract import POOL_LABEL
from joulepool.operator.config import PickerRef
from joulepool.operator.gateway import gie_pool, serving_port
from joulepool.operator.resources import parse_pool

ROOT = Path(__file__).resolve().parents[2]
GIE_CRD = ROOT / "tests" / "data" / "gie" / "inferencepools.inference.networking.k8s.io.yaml"
PICKER = PickerRef("joulepool-epp", "joulepool-system", 9002, "FailOpen")


def _schema(node: Any) -> Any:
    """OpenAPI v3 (structural) -> JSON Schema, unknown fields rejected like the API server."""
    if isinstance(node, list):
        return [_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _schema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k not in ("default", "format")}
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["properties"] = {k: _schema(v) for k, v in node["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


def _validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(GIE_CRD.read_text())
    (version,) = crd["spec"]["versions"]
    return jsonschema.Draft7Validator(_schema(version["schema"]["openAPIV3Schema"]))


def _pool(port: int | None = None, ports: list[dict[str, Any]] | None = None) -> Any:
    spec: dict[str, Any] = {
        "model": "llama-3.1-8b", "slo": {"ttftSeconds": 0.5, "tpotSeconds": 0.05},
        "demand": {"requestsPerSecond": 4, "meanInputTokens": 512, "meanOutputTokens": 128},
        "template": {"spec": {"containers": [{"name": "engine", "image": "x",
                                               **({"ports": ports} if ports else {})}]}},
    }
    if port is not None:
        spec["port"] = port
    entry = parse_pool({"apiVersion": "joulepool.dev/v1alpha1", "kind": "InferencePool",
                        "metadata": {"name": "chat", "namespace": "default", "uid": "u-1"},
                        "spec": spec})
    assert entry.pool is not None, entry.error
    return entry


@pytest.mark.parametrize(("port", "ports", "want"), [
    (8001, None, 8001),
    (None, [{"name": "metrics", "containerPort": 9100}, {"name": "http",
                                                        "containerPort": 8080}], 8080),
    (None, [{"containerPort": 7000}], 7000),
    (None, None, 8000),
])
def test_gie_pool_is_valid_and_selects_the_serving_port(port: int | None,
                                                        ports: list[dict[str, Any]] | None,
                                                        want: int) -> None:
    entry = _pool(port, ports)
    assert entry.pool is not None
    assert serving_port(entry.pool) == want
    body = gie_pool(entry, entry.pool, PICKER)
    errors = list(_validator().iter_errors(body))
    assert not errors, [e.message for e in errors]
    assert body["spec"]["targetPorts"] == [{"number": want}]
    assert body["spec"]["selector"]["matchLabels"] == {POOL_LABEL: "default.chat"}
    ref = body["spec"]["endpointPickerRef"]
    assert (ref["name"], ref["port"], ref["failureMode"]) == ("joulepool-epp",
                                                               {"number": 9002}, "FailOpen")
    (owner,) = body["metadata"]["ownerReferences"]
    assert owner["uid"] == "u-1" and owner["controller"] is True


def test_schema_check_rejects_what_gie_rejects() -> None:
    entry = _pool(8000)
    body = gie_pool(entry, entry.pool, PICKER)
    body["spec"]["endpointPickerRef"]["failureMode"] = "Sometimes"
    assert list(_validator().iter_errors(body))


def test_example_route_targets_the_pool_the_operator_creates() -> None:
    route = yaml.safe_load((ROOT / "examples" / "gateway-httproute.yaml").read_text())
    jpool = yaml.safe_load((ROOT / "examples" / "kind-chat-pool.yaml").read_text())
    entry = parse_pool(jpool)
    assert entry.pool is not None
    body = gie_pool(entry, entry.pool, PICKER)
    (rule,) = route["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert (backend["group"], backend["kind"]) == ("inference.networking.k8s.io",
                                                   "InferencePool")
    assert backend["name"] == body["metadata"]["name"]
    assert route["metadata"]["namespace"] == body["metadata"]["namespace"]
    assert body["spec"]["targetPorts"] == [{"number": 8000}]
