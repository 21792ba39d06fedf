"""Every rendered manifest is valid against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields are errors)."""

from __future__ import annotations

import functools
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from chartlib import CHART_DIR, KUBE_VERSION, PROMETHEUS_API, VALUE_SETS, rendered
from kubernetes_validate.utils import all_versions

VERSION = KUBE_VERSION.lstrip("v")
# the same schema files are read for every object: read each once
kubernetes_validate.utils.schema_contents = functools.cache(
    kubernetes_validate.utils.schema_contents)
#: kinds kubernetes-validate has no schema for (not core Kubernetes)
NOT_CORE = {("monitoring.coreos.com/v1", "ServiceMonitor"),
            ("monitoring.coreos.com/v1", "PrometheusRule")}  # promtool checks its rules


def _validate(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {path}: {exc.message}")


def test_the_schema_version_is_shipped() -> None:
    assert VERSION.rsplit(".", 1)[0] in {
        v.rsplit(".", 1)[0] for v in all_versions()}


def test_validation_can_fail() -> None:
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": 1, "selector": {}, "template": {}, "strategy": {"tpye": "x"}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)


@pytest.mark.parametrize("key", sorted(VALUE_SETS))
def test_rendered_manifests_are_valid(key: str) -> None:
    objects = list(rendered(key).objects())
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in NOT_CORE:
            assert obj["apiVersion"] == PROMETHEUS_API
            continue
        _validate(obj)


@pytest.mark.parametrize("path", sorted(p.name for p in (CHART_DIR / "crds").glob("*.yaml")))
def test_crds_are_valid(path: str) -> None:
    _validate(yaml.safe_load((CHART_DIR / "crds" / path).read_text()))


def test_service_monitor_shape() -> None:
    """No schema ships for it: check the fields the Prometheus operator requires."""
    (sm,) = rendered("prometheus").all("ServiceMonitor")
    assert set(sm["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "relabelings", "bearerTokenSecret"}
        if "bearerTokenSecret" in ep:  # a SecretKeySelector of a Secret the chart renders
            assert set(ep["bearerTokenSecret"]) == {"name", "key"}
            (secret,) = [s for s in rendered("prometheus").all("Secret")
                         if s["metadata"]["name"] == ep["bearerTokenSecret"]["name"]]
            assert ep["bearerTokenSecret"]["key"] in secret["data"]
        for rl in ep.get("relabelings", []):
            assert set(rl) <= {"sourceLabels", "targetLabel", "action", "regex", "replacement"}
