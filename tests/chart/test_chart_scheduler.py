"""The second scheduler: its KubeSchedulerConfiguration names exactly what the
extender serves (joulepool.extender.wire), and its identity is its own."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from chartlib import NAMESPACE, Rendered, name, render_raw, rendered

wire = pytest.importorskip("joulepool.extender.wire", reason="the extender is not in this build")
contract = pytest.importorskip("joulepool.api.contract")


def _config(r: Rendered) -> dict[str, Any]:
    cm = r.get("ConfigMap", name("scheduler"))
    assert list(cm["data"]) == ["scheduler-config.yaml"]
    cfg: dict[str, Any] = yaml.safe_load(cm["data"]["scheduler-config.yaml"])
    return cfg


def _containers(r: Rendered) -> dict[str, dict[str, Any]]:
    spec = r.get("Deployment", name("scheduler"))["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_configuration_kind() -> None:
    cfg = _config(rendered("default"))
    assert cfg["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    assert cfg["kind"] == "KubeSchedulerConfiguration"
    assert cfg["profiles"] == [{"schedulerName": "joulepool-scheduler"}]
    assert cfg["percentageOfNodesToScore"] == 100


def test_extender_verbs_port_and_prefix_are_what_the_extender_serves() -> None:
    (ext,) = _config(rendered("default"))["extenders"]
    url = urlsplit(ext["urlPrefix"])
    assert url.scheme == "http" and ext["enableHTTPS"] is False
    assert url.hostname == "127.0.0.1"
    assert url.port == contract.EXTENDER_PORT
    assert url.path == contract.EXTENDER_PREFIX
    verbs = {k: v for k, v in ext.items() if k.endswith("Verb")}
    assert verbs == {"filterVerb": "filter", "prioritizeVerb": "prioritize"}
    assert tuple(verbs.values()) == tuple(wire.VERBS)
    # the sidecar listens where kube-scheduler calls
    args = _containers(rendered("default"))["extender"]["args"]
    assert _flag(args, "--host") == url.hostname
    assert _flag(args, "--port") == str(url.port)
    assert _flag(args, "--prefix") == url.path


def test_extender_settings() -> None:
    (ext,) = _config(rendered("default"))["extenders"]
    assert ext["nodeCacheCapable"] is True
    assert ext["ignorable"] is False
    assert ext["weight"] == 10
    assert ext["httpTimeout"] == "5s"
    assert ext["managedResources"] == [{"name": "nvidia.com/gpu", "ignoredByScheduler": False}]
    assert "bindVerb" not in ext and "preemptVerb" not in ext
    (ext,) = _config(rendered("ignorable-all-pods"))["extenders"]
    assert ext["ignorable"] is True
    assert "managedResources" not in ext


def _extender_settings(r: Rendered) -> Any:
    from joulepool.cli import build_parser
    from joulepool.extender.settings import load_settings

    args = _containers(r)["extender"]["args"]
    return load_settings(build_parser().parse_args(args), environ={})


def test_fresh_read_values_reach_the_extender() -> None:
    from joulepool.extender.settings import Settings

    fields = ("fresh_read_timeout_seconds", "fresh_read_max_nodes",
              "fresh_read_min_interval_seconds", "fresh_reads_per_second")
    s = _extender_settings(rendered("default"))
    assert [getattr(s, f) for f in fields] == [Settings.model_fields[f].default for f in fields]
    (ext,) = _config(rendered("default"))["extenders"]  # reads end within kube-scheduler's
    assert s.fresh_read_timeout_seconds < float(ext["httpTimeout"].rstrip("s"))  # timeout
    values = {"timeoutSeconds": 0.5, "maxNodes": 3, "minIntervalSeconds": 4, "perSecond": 2.5}
    r = Rendered(render_raw({"scheduler": {"extender": {"freshReads": values}}}))
    s = _extender_settings(r)
    assert [getattr(s, f) for f in fields] == [0.5, 3, 4.0, 2.5]


def test_leader_election_uses_its_own_lease() -> None:
    le = _config(rendered("default"))["leaderElection"]
    assert le["leaderElect"] is True
    assert le["resourceLock"] == "leases"
    assert le["resourceName"] == "joulepool-scheduler" != "kube-scheduler"
    assert le["resourceNamespace"] == NAMESPACE
    role = rendered("default").get("Role", name("scheduler") + "-leader-election")
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert named == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                      "resourceNames": ["joulepool-scheduler"], "verbs": ["get", "update"]}]


def test_scheduler_runs_the_stock_image_with_this_config() -> None:
    c = _containers(rendered("default"))["kube-scheduler"]
    assert c["image"].startswith("registry.k8s.io/kube-scheduler:v")
    assert "--config=/etc/joulepool-scheduler/scheduler-config.yaml" in c["command"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/joulepool-scheduler"
    assert c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_scheduler_identity() -> None:
    r = rendered("default")
    sa = name("scheduler")
    bound = {b["roleRef"]["name"] for b in r.all("ClusterRoleBinding") + r.all("RoleBinding")
             if any(s["name"] == sa for s in b["subjects"])}
    assert {"system:kube-scheduler", "system:volume-scheduler",
            "extension-apiserver-authentication-reader",
            name("scheduler") + "-leader-election", name("extender")} <= bound


def test_extender_watches_are_read_only() -> None:
    r = rendered("default")
    for role in (r.get("ClusterRole", name("extender")), r.get("Role", name("extender"))):
        for rule in role["rules"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}
    res = {x for rule in r.get("ClusterRole", name("extender"))["rules"]
           for x in rule["resources"]}
    assert {"nodes", "pods"} <= res


def test_config_change_rolls_the_scheduler() -> None:
    a = rendered("default").get("Deployment", name("scheduler"))
    b = rendered("ignorable-all-pods").get("Deployment", name("scheduler"))
    key = "checksum/config"
    assert a["spec"]["template"]["metadata"]["annotations"][key] != (
        b["spec"]["template"]["metadata"]["annotations"][key])


@pytest.mark.parametrize("http_timeout, fresh_s", [("5s", 5), ("5s", 7.5), ("2.5s", 2.5)])
def test_fresh_reads_longer_than_the_extender_call_are_refused(http_timeout, fresh_s):
    """The extender's re-reads must end before kube-scheduler abandons the call: helm
    refuses freshReads.timeoutSeconds >= httpTimeout (given in seconds) with both named."""
    import helm_python as helm

    values = {"scheduler": {"extender": {"httpTimeout": http_timeout,
                                         "freshReads": {"timeoutSeconds": fresh_s}}}}
    with pytest.raises(helm.HelmRenderError,
                       match=r"freshReads.timeoutSeconds .* must be below .*httpTimeout"):
        render_raw(values)


@pytest.mark.parametrize("http_timeout, fresh_s", [("10s", 5), ("5s", 0), ("1m", 5)])
def test_fresh_reads_within_the_extender_call_render(http_timeout, fresh_s):
    """Below httpTimeout, or off (0), renders; other duration forms ("1m") are not
    compared (kube-scheduler's own parsing decides them)."""
    values = {"scheduler": {"extender": {"httpTimeout": http_timeout,
                                         "freshReads": {"timeoutSeconds": fresh_s}}}}
    s = _extender_settings(Rendered(render_raw(values)))
    assert s.fresh_read_timeout_seconds == fresh_s
