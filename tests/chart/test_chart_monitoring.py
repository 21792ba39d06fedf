"""Monitoring in the chart: PrometheusRule, Grafana dashboard, operator /metrics; promtool.

The rule groups live once, in ``files/prometheus-rules.yaml``: the chart renders
them into the PrometheusRule and ``promtool`` checks and unit-tests that very
file (``tests/promtool/rules_test.yaml``: every alert firing and not firing).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from chartlib import (
    CHART_DIR,
    PROMETHEUS_API,
    RELEASE,
    ROOT,
    Rendered,
    name,
    render_raw,
    rendered,
)

RULES = CHART_DIR / "files" / "prometheus-rules.yaml"
DASHBOARD = CHART_DIR / "files" / "dashboards" / "joulepool.json"
RULE_TESTS = ROOT / "tests" / "promtool" / "rules_test.yaml"
PROMTOOL = shutil.which("promtool")
NEEDS_PROMTOOL = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package 'prometheus'; `make test` installs it "
           "when run as root)")


def dashboard_queries() -> list[str]:
    """Every target expression of every panel of the shipped dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_prometheus_rule_is_the_rule_file_and_needs_the_api() -> None:
    assert "PrometheusRule" not in rendered("default").kinds()
    rule = rendered("prometheus").get("PrometheusRule", RELEASE)
    assert rule["apiVersion"] == PROMETHEUS_API
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    off = Rendered(render_raw({"metrics": {"prometheusRule": {"enabled": False}}},
                              api_versions=(PROMETHEUS_API,)))
    assert "PrometheusRule" not in off.kinds()


def test_alerts_cover_what_the_issue_asks_for() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    assert alerts == {"JoulepoolGPUClockLockedWithoutEngine", "JoulepoolNodeAgentMonitorOnly",
                      "JoulepoolPoolMissRateAboveTarget", "JoulepoolPlanInfeasible",
                      "JoulepoolCarbonSourceStale", "JoulepoolEnergyPerTokenDrift",
                      "JoulepoolProfileEpsDrift", "JoulepoolPickerDecisionP99High"}
    tested = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    for alert in alerts:  # each alert: once expected to fire, once expected silent
        cases = [c for t in tested for c in t.get("alert_rule_test", [])
                 if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in cases), alert
        assert any(not c["exp_alerts"] for c in cases), alert


def test_dashboard_configmap_is_discoverable_by_grafanas_sidecar(default_render) -> None:
    cm = default_render.get("ConfigMap", name("dashboard"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["joulepool.json"])
    assert dash == json.loads(DASHBOARD.read_text())
    assert all(p["targets"] and p["datasource"]["uid"] == "${datasource}"
               for p in dash["panels"])
    moved = Rendered(render_raw({"metrics": {"dashboard": {
        "namespace": "monitoring", "labels": {"grafana_dashboard": "1", "team": "ml"}}}}))
    cm = moved.get("ConfigMap", name("dashboard"))
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["team"] == "ml"
    off = Rendered(render_raw({"metrics": {"dashboard": {"enabled": False}}}))
    assert name("dashboard") not in [c["metadata"]["name"] for c in off.all("ConfigMap")]


def test_operator_serves_metrics_on_a_scraped_service(default_render) -> None:
    svc = default_render.get("Service", name("operator"))
    assert svc["metadata"]["labels"]["joulepool.dev/scrape"] == "true"
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 9402, "targetPort": "metrics", "protocol": "TCP"}]
    dep = default_render.get("Deployment", name("operator"))
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--metrics-port") + 1] == "9402"


def _exported_metric_names() -> set[str]:
    """Every metric family name the components register (from their source)."""
    names: set[str] = set()
    for path in (ROOT / "src" / "joulepool").rglob("*.py"):
        names.update(re.findall(r'"(joulepool_[a-z0-9_]+)"', path.read_text()))
    return names


def _metric_names_in(expr: str) -> set[str]:
    found = set(re.findall(r"\b(joulepool_[a-z0-9_]+)", expr))
    return {re.sub(r"_total$", "", n) for n in found}


def test_rules_and_dashboard_use_metric_names_the_code_exports() -> None:
    exported = _exported_metric_names()
    exprs = dashboard_queries() + [
        r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    # a histogram's series: its name with _bucket, _sum or _count
    missing = {n for e in exprs for n in _metric_names_in(e)
               if n not in exported and re.sub(r"_(bucket|sum|count)$", "", n) not in exported}
    assert not missing, f"not exported by any component: {sorted(missing)}"


@NEEDS_PROMTOOL
def test_promtool_checks_the_rules() -> None:
    out = subprocess.run([str(PROMTOOL), "check", "rules", str(RULES)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 15 rules found" in out.stdout


@NEEDS_PROMTOOL
def test_promtool_unit_tests_every_alert() -> None:
    out = subprocess.run([str(PROMTOOL), "test", "rules", RULE_TESTS.name],
                         cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@NEEDS_PROMTOOL
def test_promtool_rule_tests_can_fail(tmp_path: Path) -> None:
    """The unit tests are not vacuous: a rule file whose miss-rate alert never fires fails them."""
    broken = RULES.read_text().replace("for: 10m\n        labels:\n          severity: warning\n"
                                       "        annotations:\n          summary: pool",
                                       "for: 10h\n        labels:\n          severity: warning\n"
                                       "        annotations:\n          summary: pool", 1)
    assert broken != RULES.read_text()
    rules = tmp_path / "rules.yaml"
    rules.write_text(broken)
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["rule_files"] = [str(rules)]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tests))
    out = subprocess.run([str(PROMTOOL), "test", "rules", "t.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "JoulepoolPoolMissRateAboveTarget" in out.stdout + out.stderr


def test_carbon_configmaps_get_a_role_limited_to_their_name() -> None:
    assert not [r for r in rendered("default").all("Role")
                if r["metadata"]["namespace"] == "kube-system"]
    r = Rendered(render_raw({"operator": {"carbonConfigMaps": [
        {"namespace": "kube-system", "name": "carbonintensity"}]}}))
    role = r.get("Role", name("operator-carbon-carbonintensity"))
    assert role["metadata"]["namespace"] == "kube-system"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": ["carbonintensity"], "verbs": ["get"]}]
    binding = r.get("RoleBinding", name("operator-carbon-carbonintensity"))
    assert binding["subjects"][0]["namespace"] == "joulepool-system"
    with pytest.raises(Exception, match="carbonConfigMaps"):
        render_raw({"operator": {"carbonConfigMaps": [{"name": "x"}]}})
