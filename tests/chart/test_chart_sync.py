"""What the chart copies from the Python sources is current: the operator's
RBAC rules and the CRDs generated from the pydantic models."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml
from chartlib import CHART_DIR, ROOT, name, rendered

from joulepool.api.crd import crd_documents, render

rbac = pytest.importorskip("joulepool.operator.rbac", reason="the operator is not in this build")


def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_chart", ROOT / "scripts" / "sync_chart.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["sync_chart"] = module
    spec.loader.exec_module(module)
    return module


def test_sync_chart_check_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert _sync_module().main(["--check"]) == 0, capsys.readouterr().out


def test_rendered_cluster_role_is_the_operators() -> None:
    role = rendered("default").get("ClusterRole", name("operator"))
    assert role["rules"] == rbac.CLUSTER_RULES


def test_rendered_role_is_the_operators() -> None:
    role = rendered("default").get("Role", name("operator"))
    assert role["rules"] == rbac.NAMESPACE_RULES


def test_operator_roles_are_bound_to_its_account_only() -> None:
    r = rendered("default")
    for kind, ref in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        b = r.get(kind, name("operator"))
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": ref,
                                "name": name("operator")}
        assert [s["name"] for s in b["subjects"]] == [name("operator")]
    dep = r.get("Deployment", name("operator"))
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == name("operator")


def test_chart_crds_are_the_generated_crds() -> None:
    generated = {n: render(doc) for n, doc in crd_documents().items()}
    chart = {p.name: p.read_text() for p in (CHART_DIR / "crds").glob("*.yaml")}
    assert chart == generated


def test_chart_crds_equal_the_repository_crds() -> None:
    """crds/*.yaml (`joulepool crds`, `make crds`) and the chart ship the same text."""
    repo = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_text() for p in (CHART_DIR / "crds").glob("*.yaml")}
    assert repo and chart == repo


def test_helm_loads_the_crds() -> None:
    from chartlib import chart

    loaded = {Path(c["filename"]).name: c for c in chart().crds}
    assert set(loaded) == {p.name for p in (CHART_DIR / "crds").glob("*.yaml")}
    for c in loaded.values():
        assert yaml.safe_load(c["data"])["kind"] == "CustomResourceDefinition"
