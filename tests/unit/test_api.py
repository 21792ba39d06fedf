"""Resource models, generated CRDs and the plan document."""

from pathlib import Path

import jsonschema
import pytest
import yaml

from joulepool.api.crd import crd_documents, render
from joulepool.api.load import ResourceError, load_manifests, parse_resource, profile_from_resource
from joulepool.api.models import EnergyPolicy, GPUProfile, InferencePool
from joulepool.api.plan import PlanDocument, PlannedNode
from joulepool.cli import main

ROOT = Path(__file__).resolve().parents[2]

POOL = {
    "apiVersion": "joulepool.dev/v1alpha1",
    "kind": "InferencePool",
    "metadata": {"name": "chat", "namespace": "default"},
    "spec": {
        "model": "llama-3.1-8b",
        "slo": {"ttftSeconds": 0.3, "tpotSeconds": 0.05},
        "demand": {"requestsPerSecond": 10, "meanInputTokens": 1000, "meanOutputTokens": 150},
    },
}


def test_committed_crds_are_what_the_models_generate():
    for name, doc in crd_documents().items():
        path = ROOT / "crds" / name
        assert path.exists(), f"missing {path}: run `joulepool crds`"
        assert path.read_text() == render(doc), f"{path} is stale: run `joulepool crds`"
    assert main(["crds", "--check", "--out", str(ROOT / "crds")]) == 0


def test_crd_check_detects_stale_files(tmp_path):
    assert main(["crds", "--out", str(tmp_path)]) == 0
    f = tmp_path / "inferencepools.joulepool.dev.yaml"
    f.write_text(f.read_text().replace("jpool", "infpool"))
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 1


def _walk(schema):
    yield schema
    for v in schema.get("properties", {}).values():
        yield from _walk(v)
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"])


def test_crd_schemas_are_structural():
    for doc in crd_documents().values():
        version = doc["spec"]["versions"][0]
        schema = version["openAPIV3Schema"] if "openAPIV3Schema" in version else \
            version["schema"]["openAPIV3Schema"]
        for node in _walk(schema):
            assert "$ref" not in node and "title" not in node
            assert "type" in node or node.get("x-kubernetes-int-or-string"), node
            assert not ("properties" in node and "additionalProperties" in node)
        assert version["subresources"] == {"status": {}}
    pools = crd_documents()["inferencepools.joulepool.dev.yaml"]["spec"]
    assert pools["names"]["shortNames"] == ["jpool"] and pools["scope"] == "Namespaced"


def test_crd_schema_accepts_valid_and_rejects_invalid_pool():
    schema = crd_documents()["inferencepools.joulepool.dev.yaml"]["spec"]["versions"][0][
        "schema"]["openAPIV3Schema"]
    # OpenAPI 3.0 booleans exclusiveMinimum -> draft-4 semantics
    jsonschema.Draft4Validator(schema).validate(POOL)
    bad = {**POOL, "spec": {**POOL["spec"], "slo": {"ttftSeconds": 0, "tpotSeconds": 0.05}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(schema).validate(bad)


def test_invalid_pool_names_the_field():
    bad = {**POOL, "spec": {**POOL["spec"], "slo": {"ttftSeconds": -1, "tpotSeconds": 0.05}}}
    with pytest.raises(ResourceError) as err:
        parse_resource(bad, "pools.yaml")
    assert err.value.field == "spec.slo.ttftSeconds"
    assert "pools.yaml" in str(err.value) and "greater than 0" in str(err.value)
    typo = {**POOL, "spec": {**POOL["spec"], "modle": "x"}}
    with pytest.raises(ResourceError) as err:
        parse_resource(typo)
    assert err.value.field == "spec.modle"
    with pytest.raises(ResourceError, match="unknown kind"):
        parse_resource({"kind": "Pod"})


def test_demand_series_forecast_and_defaults():
    pool = InferencePool.model_validate(POOL)
    assert pool.spec.tier == "interactive"
    assert pool.spec.demand.forecast(3) == [10, 10, 10]
    series = {**POOL["spec"]["demand"], "series": [1, 2]}
    pool2 = InferencePool.model_validate({**POOL, "spec": {**POOL["spec"], "demand": series}})
    assert pool2.spec.demand.forecast(4) == [1, 2, 2, 2]
    dumped = pool.model_dump(by_alias=True, exclude_none=True)
    assert dumped["spec"]["slo"]["ttftSeconds"] == 0.3


def test_energy_policy_and_profile_validation():
    pol = EnergyPolicy.model_validate({"kind": "EnergyPolicy", "metadata": {"name": "default"}})
    assert pol.spec.plan_interval_seconds == 1800 and pol.spec.alpha == 1.1
    with pytest.raises(ValueError, match="exactly one"):
        EnergyPolicy.model_validate({
            "kind": "EnergyPolicy", "metadata": {"name": "default"},
            "spec": {"carbon": [{"site": "a", "gramsPerKWh": 1, "series": [1]}]},
        })
    prof = GPUProfile.model_validate({
        "kind": "GPUProfile", "metadata": {"name": "h100-8b"},
        "spec": {"product": "H100", "model": "m", "idleWatts": 70, "maxBatch": 64,
                 "prefillTokensPerSecond": 9000,
                 "clock": {"minMHz": 1000, "maxMHz": 1980},
                 "batchPoints": [{"batch": 1, "interTokenLatencySeconds": 0.007,
                                  "powerWatts": 400},
                                 {"batch": 64, "interTokenLatencySeconds": 0.012,
                                  "powerWatts": 600}]},
    })
    core = profile_from_resource(prof)
    assert float(core.power_w(64)) == pytest.approx(600)
    assert core.points[0].itl_ms.source == "GPUProfile h100-8b"


def test_examples_validate():
    kinds = {type(r).__name__ for r in load_manifests(ROOT / "examples" / "pools.yaml")}
    assert kinds == {"InferencePool", "EnergyPolicy"}
    data = yaml.safe_load((ROOT / "examples" / "cluster.yaml").read_text())
    assert data["nodes"]


def test_plan_document_round_trip():
    doc = PlanDocument(version=3, nodes={"n1": PlannedNode(site="s", product="H100", gpus=8,
                                                           pools={"default.chat": 4})})
    again = PlanDocument.from_json(doc.to_json())
    assert again == doc and '"generatedAt"' not in doc.to_json()
