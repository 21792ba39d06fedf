"""values.schema.json: defaults pass, typos and bad values fail, at every level;
and `helm lint` is clean."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import pytest
import yaml
from chartlib import CHART_DIR, KUBE_VERSION, ROOT, chart, render_raw

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())
DEFAULTS = yaml.safe_load((CHART_DIR / "values.yaml").read_text())


def _objects(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node of type object, with its dotted path."""
    out = []
    if isinstance(node, dict):
        if node.get("type") == "object":
            out.append((path or "<root>", node))
        for key, child in (node.get("properties") or {}).items():
            out += _objects(child, f"{path}.{key}" if path else key)
        if isinstance(node.get("items"), dict):
            out += _objects(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += _objects(node["additionalProperties"], f"{path}.*")
    return out


def test_every_object_level_is_closed() -> None:
    """Declared properties and nothing else; a free-form map says what its values are."""
    objects = _objects(SCHEMA)
    assert len(objects) > 20
    for path, node in objects:
        if "properties" in node:
            assert node.get("additionalProperties") is False, path
        elif path.endswith(("affinity.nodeAffinity", "affinity.podAffinity",
                            "affinity.podAntiAffinity")):
            continue  # Kubernetes Affinity, passed through as given
        else:
            assert isinstance(node.get("additionalProperties"), dict), path


def test_every_default_is_declared() -> None:
    def walk(values: Any, schema: dict[str, Any], path: str) -> None:
        if isinstance(values, dict) and "properties" in schema:
            for key, value in values.items():
                assert key in schema["properties"], f"{path}.{key} is not in values.schema.json"
                walk(value, schema["properties"][key], f"{path}.{key}")

    walk(DEFAULTS, SCHEMA, "")


def test_defaults_and_kind_values_pass() -> None:
    chart().validate_schema(None)
    chart().validate_schema(yaml.safe_load((ROOT / "kind" / "values.yaml").read_text()))


@pytest.mark.parametrize("values, where", [
    ({"imagee": {"tag": "x"}}, "imagee"),
    ({"image": {"tagg": "x"}}, "tagg"),
    ({"scheduler": {"extender": {"ignorabel": True}}}, "ignorabel"),
    ({"scheduler": {"leaderElection": {"leaseNmae": "x"}}}, "leaseNmae"),
    ({"nodeAgent": {"backend": "nvlm"}}, "/nodeAgent/backend"),
    ({"nodeAgent": {"clockcontrol": False}}, "clockcontrol"),
    ({"fakeGPUs": {"enable": True}}, "enable"),
    ({"fakeGPUs": {"products": [{"label": "NVIDIA-L4", "product": "L4", "cuont": 1}]}},
     "cuont"),
    ({"router": {"pdb": {"minAvailable": 1}}}, "minAvailable"),
    ({"router": {"resources": {"request": {"cpu": "1"}}}}, "request"),
    ({"operator": {"tolerations": [{"key": "a", "efect": "NoSchedule"}]}}, "efect"),
    ({"metrics": {"serviceMonitor": {"enabeld": True}}}, "enabeld"),
    ({"scheduler": {"extender": {"httpTimeout": "5 seconds"}}}, "httpTimeout"),
    ({"scheduler": {"extender": {"port": 70000}}}, "port"),
    ({"scheduler": {"extender": {"freshReads": {"maxNodes": 0}}}}, "maxNodes"),
    ({"scheduler": {"extender": {"freshReads": {"perSecond": 0}}}}, "perSecond"),
    ({"scheduler": {"extender": {"freshReads": {"timeoutSecond": 1}}}}, "timeoutSecond"),
    ({"logLevel": "verbose"}, "logLevel"),
    ({"crds": {"templated": "yes"}}, "templated"),
])
def test_typos_and_bad_values_are_rejected(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=where):
        chart().validate_schema(values)
    # and `helm template` / `helm install` refuse them too
    with pytest.raises(helm.HelmValuesError, match=where):
        render_raw(values)


def test_lint_is_clean() -> None:
    for values in (None, {"fakeGPUs": {"enabled": True}, "nodeAgent": {"backend": "simulated"}},
                   {"crds": {"templated": True}}):
        report = helm.lint(CHART_DIR, values, strict=True, kube_version=KUBE_VERSION)
        assert report["errors"] == []
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert problems == [], problems
        # info only: no icon URL is published yet
        assert {m["error"] for m in report["messages"]} <= {"icon is recommended"}


def test_lint_catches_a_broken_chart(tmp_path: Any) -> None:
    """The lint test can fail: a chart with a template error is reported."""
    import shutil

    broken = tmp_path / "joulepool"
    shutil.copytree(CHART_DIR, broken)
    (broken / "templates" / "broken.yaml").write_text("{{ .Values.nope.nope }}\n")
    report = helm.lint(broken, None, strict=True, kube_version=KUBE_VERSION)
    assert any(m["severity"] == 3 for m in report["messages"]) or report["errors"]
