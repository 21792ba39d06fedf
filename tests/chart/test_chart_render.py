"""The chart as the Helm engine renders it: objects, wiring, security, switches."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
import yaml
from chartlib import (
    KUBE_VERSION,
    NAMESPACE,
    PROMETHEUS_API,
    RELEASE,
    VALUE_SETS,
    Rendered,
    name,
    render_raw,
    rendered,
)

JOULEPOOL_IMAGE = "ghcr.io/joulepool/joulepool:0.1.0"


def _docs(files: dict[str, str]) -> list[dict[str, Any]]:
    return [d for p, t in files.items() if not p.endswith("NOTES.txt")
            for d in yaml.safe_load_all(t) if d]


# --------------------------------------------------------------------------
# the SDK options the tests rely on
# --------------------------------------------------------------------------
def test_sdk_honours_kube_version() -> None:
    r = Rendered(render_raw(kube_version="v1.29.3"))
    image = r.get("Deployment", name("scheduler"))["spec"]["template"]["spec"]["containers"][0]
    assert image["image"] == "registry.k8s.io/kube-scheduler:v1.29.3"


def test_sdk_honours_api_versions() -> None:
    assert "ServiceMonitor" not in rendered("default").kinds()
    assert "ServiceMonitor" in rendered("prometheus").kinds()


# --------------------------------------------------------------------------
# what is there
# --------------------------------------------------------------------------
def test_default_objects(default_render: Rendered) -> None:
    have = {(o["kind"], o["metadata"]["name"]) for o in default_render.objects()}
    for expected in [
        ("Deployment", name("operator")),
        ("Deployment", name("scheduler")),
        ("ConfigMap", name("scheduler")),
        ("Deployment", name("router")),
        ("Service", name("router")),
        ("PodDisruptionBudget", name("router")),
        ("DaemonSet", name("node-agent")),
        ("Service", name("node-agent")),
        ("ClusterRole", name("operator")),
        ("Role", name("operator")),
        ("ClusterRoleBinding", name("scheduler") + "-kube-scheduler"),
        ("ClusterRoleBinding", name("scheduler") + "-volume-scheduler"),
    ]:
        assert expected in have
    kinds = default_render.kinds()
    assert "CustomResourceDefinition" not in kinds  # crds/ only, by default
    assert not [o for o in default_render.all("DaemonSet") if "device-plugin" in
                o["metadata"]["name"]]
    assert "ServiceMonitor" not in kinds


def test_names_are_unique(any_render: Rendered) -> None:
    seen = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
            for o in any_render.objects()]
    assert len(seen) == len(set(seen))


def test_namespaced_objects_are_in_the_release_namespace(any_render: Rendered) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
    for o in any_render.objects():
        ns = o["metadata"].get("namespace")
        if o["kind"] in cluster_scoped:
            assert ns is None, o["metadata"]["name"]
        elif o["kind"] == "RoleBinding" and o["roleRef"]["name"] == (
                "extension-apiserver-authentication-reader"):
            assert ns == "kube-system"
        else:
            assert ns == NAMESPACE, (o["kind"], o["metadata"]["name"])


def test_every_object_is_labelled(any_render: Rendered) -> None:
    for o in any_render.objects():
        labels = o["metadata"].get("labels") or {}
        assert labels.get("app.kubernetes.io/part-of") == "joulepool", o["metadata"]["name"]
        assert labels.get("app.kubernetes.io/managed-by") == "Helm"


def test_selectors_match_pod_labels(any_render: Rendered) -> None:
    workloads = any_render.workloads()
    pods = [w["spec"]["template"]["metadata"]["labels"] for w in workloads]
    for w in workloads:
        sel = w["spec"]["selector"]["matchLabels"]
        # its own pods, and no other workload's
        assert [sel.items() <= p.items() for p in pods] == [x is w for x in workloads], (
            w["metadata"]["name"])
    for svc in any_render.all("Service") + [
            {"metadata": p["metadata"], "spec": {"selector": p["spec"]["selector"]["matchLabels"]}}
            for p in any_render.all("PodDisruptionBudget")]:
        sel = svc["spec"]["selector"]
        components = {p["app.kubernetes.io/component"] for p in pods if sel.items() <= p.items()}
        assert len(components) == 1, svc["metadata"]["name"]


def test_service_accounts_exist(any_render: Rendered) -> None:
    accounts = {o["metadata"]["name"] for o in any_render.all("ServiceAccount")}
    for w in any_render.workloads():
        spec = w["spec"]["template"]["spec"]
        if spec.get("automountServiceAccountToken") is False:
            continue  # the device plugin talks to the kubelet only
        assert spec.get("serviceAccountName") in accounts, w["metadata"]["name"]
    for b in any_render.all("ClusterRoleBinding") + any_render.all("RoleBinding"):
        for s in b["subjects"]:
            assert s["name"] in accounts and s["namespace"] == NAMESPACE


# --------------------------------------------------------------------------
# security
# --------------------------------------------------------------------------
#: (component, container) that may run as root, and why
ROOT_ALLOWED = {
    # CAP_SYS_ADMIN to lock clocks is only effective for a root process
    ("node-agent", "agent"),
    # the uninstall hook's reset of locked clocks needs the same privilege
    ("node-agent-reset", "reset"),
    # chmod of the simulated GPUs' hostPath directory (owned by root)
    ("node-agent", "gpu-state-dir"),
    ("device-plugin", "gpu-state-dir"),
    # its socket goes in the kubelet's root-owned device-plugins directory
    ("device-plugin", "device-plugin"),
}


def _component(w: dict[str, Any]) -> str:
    return str(w["metadata"]["labels"]["app.kubernetes.io/component"])


def _agents(r: Rendered) -> list[dict[str, Any]]:
    return [w for w in r.all("DaemonSet") if _component(w) == "node-agent"]


def _pod_sc(w: dict[str, Any]) -> dict[str, Any]:
    return w["spec"]["template"]["spec"].get("securityContext") or {}


def test_containers_are_locked_down(any_render: Rendered) -> None:
    for w, c, _ in any_render.containers():
        where = f"{w['metadata']['name']}/{c['name']}"
        sc = c.get("securityContext") or {}
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not sc.get("privileged"), where
        res = c.get("resources") or {}
        assert res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory"), where
        assert res.get("limits", {}).get("cpu") and res.get("limits", {}).get("memory"), where
        runs_as_root = (sc.get("runAsUser", _pod_sc(w).get("runAsUser")) == 0)
        if runs_as_root:
            assert (_component(w), c["name"]) in ROOT_ALLOWED, f"{where} runs as root"
        else:
            assert _pod_sc(w).get("runAsNonRoot") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
        assert _pod_sc(w).get("seccompProfile") == {"type": "RuntimeDefault"}, where


def _added_caps(r: Rendered) -> dict[str, list[str]]:
    return {f"{_component(w)}/{c['name']}":
            c.get("securityContext", {}).get("capabilities", {}).get("add", [])
            for w, c, _ in r.containers()
            if c.get("securityContext", {}).get("capabilities", {}).get("add")}


def test_only_the_node_agent_gets_sys_admin(any_render: Rendered) -> None:
    caps = _added_caps(any_render)
    assert set(caps) <= {"node-agent/agent", "node-agent-reset/reset"}
    assert all(v == ["SYS_ADMIN"] for v in caps.values())


def test_sys_admin_only_to_lock_real_clocks() -> None:
    assert _added_caps(rendered("default")) == {"node-agent/agent": ["SYS_ADMIN"],
                                                "node-agent-reset/reset": ["SYS_ADMIN"]}
    ds = rendered("default").get("DaemonSet", name("node-agent"))
    assert _pod_sc(ds)["runAsUser"] == 0
    for key in ("simulated", "monitor-only", "kind"):
        assert _added_caps(rendered(key)) == {}, key
        for ds in _agents(rendered(key)):
            assert _pod_sc(ds)["runAsNonRoot"] is True
            assert _pod_sc(ds)["runAsUser"] == 65532


def test_only_daemonsets_mount_host_paths(any_render: Rendered) -> None:
    for w in any_render.workloads():
        paths = {v["hostPath"]["path"] for v in w["spec"]["template"]["spec"].get("volumes", [])
                 if "hostPath" in v}
        if _component(w) == "device-plugin":
            assert paths == {"/var/lib/kubelet/device-plugins", "/var/run/joulepool/gpus"}
        elif _component(w) == "node-agent-reset":  # the simulated GPUs' state only
            assert paths <= {"/var/run/joulepool/gpus"}
        elif _component(w) == "node-agent":
            assert paths <= {"/var/run/joulepool/gpus", "/var/lib/kubelet/pod-resources"}
            # the kubelet's PodResources socket (engines -> GPUs), read-only
            c = w["spec"]["template"]["spec"]["containers"][0]
            mount = next(m for m in c["volumeMounts"] if m["name"] == "pod-resources")
            assert mount["mountPath"] == "/var/lib/kubelet/pod-resources"
            assert mount["readOnly"] is True
        else:
            assert not paths, w["metadata"]["name"]


# --------------------------------------------------------------------------
# operator
# --------------------------------------------------------------------------
def _container(r: Rendered, kind: str, obj: str, container: str) -> dict[str, Any]:
    spec = r.get(kind, obj)["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == container)


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_operator_is_a_single_recreated_replica(any_render: Rendered) -> None:
    dep = any_render.get("Deployment", name("operator"))
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}


def test_operator_liveness_is_on_kopfs_health_port(default_render: Rendered) -> None:
    c = _container(default_render, "Deployment", name("operator"), "operator")
    port = _flag(c["args"], "--liveness")
    assert port == "8080"
    assert c["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 9402, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_operator_wiring(default_render: Rendered) -> None:
    args = _container(default_render, "Deployment", name("operator"), "operator")["args"]
    assert args[args.index("operator") - 2:args.index("operator")] == ["--log-level", "INFO"]
    assert _flag(args, "--scheduler-name") == "joulepool-scheduler"
    assert _flag(args, "--namespace") == "$(POD_NAMESPACE)"
    assert "--watch-namespace" not in args
    r = rendered("ignorable-all-pods")
    args = _container(r, "Deployment", name("operator"), "operator")["args"]
    assert _flag(args, "--watch-namespace") == "serving"


def test_scheduler_name_is_shared(default_render: Rendered) -> None:
    """The operator writes the schedulerName the second scheduler's profile serves."""
    args = _container(default_render, "Deployment", name("operator"), "operator")["args"]
    cm = default_render.get("ConfigMap", name("scheduler"))
    cfg = yaml.safe_load(cm["data"]["scheduler-config.yaml"])
    assert [p["schedulerName"] for p in cfg["profiles"]] == [_flag(args, "--scheduler-name")]


# --------------------------------------------------------------------------
# router
# --------------------------------------------------------------------------
def test_router_service_and_pdb(default_render: Rendered) -> None:
    svc = default_render.get("Service", name("router"))
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 8888, "targetPort": "http", "protocol": "TCP"}]
    c = _container(default_render, "Deployment", name("router"), "router")
    # the routing service's own command (no longer the extender's)
    assert c["args"][c["args"].index("--log-level") + 2] == "router"
    assert c["ports"][0] == {"name": "http", "containerPort": 8888, "protocol": "TCP"}
    assert _flag(c["args"], "--port") == "8888"
    assert _flag(c["args"], "--host") == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pdb = default_render.get("PodDisruptionBudget", name("router"))
    assert pdb["spec"]["maxUnavailable"] == 1
    assert default_render.get("Deployment", name("router"))["spec"]["replicas"] == 2
    assert "PodDisruptionBudget" not in rendered("ignorable-all-pods").kinds()


def test_router_replicas_without_client_affinity(default_render: Rendered) -> None:
    """The proxy learns each outcome on the replica that routed it, so the Service spreads
    requests over replicas with no ClientIP pinning."""
    svc = default_render.get("Service", name("router"))
    assert "sessionAffinity" not in svc["spec"]
    assert svc["spec"]["type"] == "ClusterIP"
    assert default_render.get("Deployment", name("router"))["spec"]["replicas"] == 2
    # the PDB never blocks an eviction (one replica at a time, and a single one too)
    pdb = default_render.get("PodDisruptionBudget", name("router"))["spec"]
    assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb
    scaled = Rendered(render_raw({"router": {"replicas": 3}}))
    assert scaled.get("Deployment", name("router"))["spec"]["replicas"] == 3
    assert "sessionAffinity" not in scaled.get("Service", name("router"))["spec"]
    single = Rendered(render_raw({"router": {"replicas": 1}}))
    assert single.get("Deployment", name("router"))["spec"]["replicas"] == 1


def test_router_replicas_share_counts_through_their_own_leases(default_render: Rendered
                                                               ) -> None:
    """Each replica publishes its counts in a Lease named after (and owned by) its Pod:
    the pod's name and UID come from the downward API; the Role allows leases in the
    release namespace only, and no verb the sharing does not use."""
    c = _container(default_render, "Deployment", name("router"), "router")
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
           for e in c["env"]}
    assert env["JOULEPOOL_ROUTER_REPLICA_NAME"] == "metadata.name"
    assert env["JOULEPOOL_ROUTER_REPLICA_UID"] == "metadata.uid"
    assert float(_flag(c["args"], "--replica-sync-seconds")) > 0
    assert float(_flag(c["args"], "--replica-ttl-seconds")) > float(
        _flag(c["args"], "--replica-sync-seconds"))
    role = default_render.get("Role", name("router-replicas"))
    assert role["metadata"]["namespace"] == default_render.get(
        "Deployment", name("router"))["metadata"]["namespace"]
    assert role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                              "verbs": ["list", "create", "patch"]}]
    binding = default_render.get("RoleBinding", name("router-replicas"))
    assert binding["roleRef"]["name"] == name("router-replicas")
    assert [s["name"] for s in binding["subjects"]] == [
        default_render.get("Deployment", name("router"))["spec"]["template"]["spec"][
            "serviceAccountName"]]
    # the router reads the node agents' energy pages on their metrics port
    assert _flag(c["args"], "--energy-metrics-port") == "9400"
    moved = Rendered(render_raw({"nodeAgent": {"metricsPort": 9500}}))
    assert _flag(_container(moved, "Deployment", name("router"), "router")["args"],
                 "--energy-metrics-port") == "9500"
    no_agents = Rendered(render_raw({"nodeAgent": {"enabled": False}}))
    no_agent_args = _container(no_agents, "Deployment", name("router"), "router")["args"]
    assert _flag(no_agent_args, "--energy-metrics-port") == "0"
    # no node agent steers the clocks: the router reads decode energy at the top clock
    assert "--no-clocks-follow-load" in no_agent_args
    assert "--no-clocks-follow-load" not in c["args"]
    observe_only = Rendered(render_raw({"nodeAgent": {"clockControl": False}}))
    assert "--no-clocks-follow-load" in _container(
        observe_only, "Deployment", name("router"), "router")["args"]
    # SIGTERM: readiness fails for --drain-seconds, then in-flight requests get 10 s
    pod = default_render.get("Deployment", name("router"))["spec"]["template"]["spec"]
    drain = float(_flag(c["args"], "--drain-seconds"))
    assert drain > 0 and pod["terminationGracePeriodSeconds"] >= drain + 10


# --------------------------------------------------------------------------
# node agent and fake GPUs
# --------------------------------------------------------------------------
def test_node_agent_runs_on_gpu_nodes(default_render: Rendered) -> None:
    spec = default_render.get("DaemonSet", name("node-agent"))["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        spec["tolerations"])
    c = spec["containers"][0]
    assert _flag(c["args"], "--backend") == "nvml"
    assert _flag(c["args"], "--metrics-port") == "9400"
    assert _flag(c["args"], "--namespace") == "$(POD_NAMESPACE)"
    assert "--gpu-state" not in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert c["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    svc = default_render.get("Service", name("node-agent"))
    assert svc["spec"]["clusterIP"] == "None"


def test_simulated_backend_switch() -> None:
    """One agent DaemonSet per simulated product, on that product's nodes."""
    agents = _agents(rendered("simulated"))
    seen = {}
    for ds in agents:
        spec = ds["spec"]["template"]["spec"]
        c = spec["containers"][0]
        assert _flag(c["args"], "--backend") == "simulated"
        assert _flag(c["args"], "--gpu-state") == "/var/run/joulepool/gpus/state.json"
        assert "--sim-unprivileged" not in c["args"]
        assert "NVIDIA_VISIBLE_DEVICES" not in {e["name"] for e in c["env"]}
        assert "runtimeClassName" not in spec
        assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
        seen[spec["nodeSelector"]["nvidia.com/gpu.product"]] = (
            _flag(c["args"], "--product"), _flag(c["args"], "--count"))
        init = spec["initContainers"][0]
        assert init["volumeMounts"][0]["mountPath"] == "/var/run/joulepool/gpus"
    assert seen == {"NVIDIA-H100-80GB-HBM3": ("H100", "8"),
                    "NVIDIA-A100-SXM4-80GB": ("A100", "8"), "NVIDIA-L4": ("L4", "4")}


def test_simulated_agents_share_state_with_the_device_plugins() -> None:
    """The agent and the device plugin of a node agree on product and count."""
    r = rendered("kind")
    agents = {}
    for ds in _agents(r):
        spec = ds["spec"]["template"]["spec"]
        c = spec["containers"][0]
        agents[spec["nodeSelector"]["nvidia.com/gpu.product"]] = (
            _flag(c["args"], "--product"), _flag(c["args"], "--count"))
    plugins = {}
    for ds in r.all("DaemonSet"):
        if _component(ds) == "device-plugin":
            spec = ds["spec"]["template"]["spec"]
            c = spec["containers"][0]
            plugins[spec["nodeSelector"]["nvidia.com/gpu.product"]] = (
                _flag(c["args"], "--product"), _flag(c["args"], "--count"))
    assert agents == plugins and len(agents) == 3


def test_monitor_only_switch() -> None:
    ds = rendered("monitor-only").get("DaemonSet", name("node-agent"))
    assert _pod_sc(ds)["runAsNonRoot"] is True
    r = Rendered(render_raw({"nodeAgent": {"backend": "simulated", "clockControl": False}}))
    for ds in _agents(r):
        assert "--sim-unprivileged" in ds["spec"]["template"]["spec"]["containers"][0]["args"]


def test_node_agent_switch_off() -> None:
    assert name("node-agent") not in {
        o["metadata"]["name"] for o in rendered("ignorable-all-pods").objects()}


def test_fake_gpus_switch() -> None:
    r = rendered("fake-gpus")
    plugins = [d for d in r.all("DaemonSet") if "device-plugin" in d["metadata"]["name"]]
    assert sorted(d["metadata"]["name"] for d in plugins) == [
        name("device-plugin-a100"), name("device-plugin-h100"), name("device-plugin-l4")]
    by_product = {}
    for d in plugins:
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        by_product[_flag(c["args"], "--product")] = (
            spec["nodeSelector"]["nvidia.com/gpu.product"], _flag(c["args"], "--count"))
        assert _flag(c["args"], "--resource-name") == "nvidia.com/gpu"
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/var/lib/kubelet/device-plugins" in mounts
        assert spec["automountServiceAccountToken"] is False
    assert by_product == {"H100": ("NVIDIA-H100-80GB-HBM3", "8"),
                          "A100": ("NVIDIA-A100-SXM4-80GB", "8"),
                          "L4": ("NVIDIA-L4", "4")}


# --------------------------------------------------------------------------
# CRDs, ServiceMonitor, NOTES
# --------------------------------------------------------------------------
def test_templated_crds_equal_the_crds_directory() -> None:
    from chartlib import CHART_DIR

    shipped = {}
    for p in sorted((CHART_DIR / "crds").glob("*.yaml")):
        doc = yaml.safe_load(p.read_text())
        shipped[doc["metadata"]["name"]] = doc
    templated = {d["metadata"]["name"]: d for d in rendered("templated-crds").all(
        "CustomResourceDefinition")}
    assert set(templated) == set(shipped) and shipped
    for crd_name, doc in templated.items():
        meta = doc.pop("metadata")
        assert meta["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert meta["labels"]["app.kubernetes.io/part-of"] == "joulepool"
        want = dict(shipped[crd_name])
        want.pop("metadata")
        assert doc == want, crd_name


def test_templated_crds_without_keep() -> None:
    r = Rendered(render_raw({"crds": {"templated": True, "keep": False}}))
    for crd in r.all("CustomResourceDefinition"):
        assert "annotations" not in crd["metadata"]


def test_service_monitor_needs_the_api_and_the_switch() -> None:
    sm = rendered("prometheus").get("ServiceMonitor", RELEASE)
    assert sm["apiVersion"] == PROMETHEUS_API
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["http", "metrics"]
    selected = [s for s in rendered("prometheus").all("Service")
                if sm["spec"]["selector"]["matchLabels"].items()
                <= s["metadata"]["labels"].items()]
    assert sorted(s["metadata"]["name"] for s in selected) == [
        name("node-agent"), name("operator"), name("router")]
    off = Rendered(render_raw({"metrics": {"serviceMonitor": {"enabled": False}}},
                              api_versions=(PROMETHEUS_API,)))
    assert "ServiceMonitor" not in off.kinds()


def test_notes_explain_the_ignorable_choice() -> None:
    notes = rendered("default").notes
    assert "ignorable=false" in notes and "stay Pending" in notes
    notes = rendered("ignorable-all-pods").notes
    assert "ignorable=true" in notes and "skips it" in notes
    assert "FAKE GPUs" in rendered("fake-gpus").notes
    assert "FAKE GPUs" not in rendered("default").notes


def test_image_and_scheduler_image(default_render: Rendered) -> None:
    for w, c, _ in default_render.containers():
        if c["name"] == "kube-scheduler":
            assert c["image"] == f"registry.k8s.io/kube-scheduler:{KUBE_VERSION}"
        else:
            assert c["image"] == JOULEPOOL_IMAGE, w["metadata"]["name"]
    r = rendered("ignorable-all-pods")
    c = _container(r, "Deployment", name("scheduler"), "kube-scheduler")
    assert c["image"] == "registry.k8s.io/kube-scheduler:v1.30.4"
    vendor = Rendered(render_raw(kube_version="v1.31.2-eks-7f9249a"))
    c = _container(vendor, "Deployment", name("scheduler"), "kube-scheduler")
    assert c["image"] == "registry.k8s.io/kube-scheduler:v1.31.2"


def test_kind_values_use_the_side_loaded_image() -> None:
    for _, c, _ in rendered("kind").containers():
        if c["name"] != "kube-scheduler":
            assert c["image"] == "joulepool:dev"
            assert c["imagePullPolicy"] == "Never"


# --------------------------------------------------------------------------
# every joulepool container's command line parses with the real CLI
# --------------------------------------------------------------------------
def _joulepool_commands() -> dict[str, list[tuple[str, list[str]]]]:
    """command -> [(where, args)] over every values set."""
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for key in VALUE_SETS:
        for w, c, _ in rendered(key).containers():
            args = [a.replace("$(POD_NAMESPACE)", NAMESPACE) for a in c.get("args", [])]
            if c.get("command") or not args:
                continue  # kube-scheduler, the python -c init container
            i = 2 if args[0] == "--log-level" else 0
            out.setdefault(args[i], []).append((f"{key}: {w['metadata']['name']}/{c['name']}",
                                                args))
    return out


COMMANDS = _joulepool_commands()


def _validate_operator(args: Any) -> None:
    from joulepool.operator.cli import config_from_args

    config_from_args(args)


def _validate_extender(args: Any) -> None:
    from joulepool.extender.settings import load_settings

    load_settings(args, environ={})


def _validate_router(args: Any) -> None:
    import tempfile

    from joulepool.router.settings import load_settings

    # the token file comes from a Secret volume at run time (its mount and key are
    # checked in test_chart_security.py); here any readable file stands in for it
    with tempfile.NamedTemporaryFile("w", suffix=".token") as token:
        if getattr(args, "token_file", None) is not None:
            token.write("t")
            token.flush()
            args.token_file = token.name
        load_settings(args, environ={})


def _validate_sidecar(args: Any) -> None:
    from joulepool.nodeagent.runner import build_config
    from joulepool.nodeagent.settings import NodeAgentSettings
    from joulepool.settings import load

    build_config(load(NodeAgentSettings, args, environ={}), "node-a")


def _validate_device_plugin(args: Any) -> None:
    from joulepool.fakes.settings import DevicePluginSettings
    from joulepool.settings import load

    load(DevicePluginSettings, args, environ={})


#: the command's own validation of parsed arguments, where it has one that
#: needs no cluster (what `run` checks before it starts serving)
VALIDATE = {"operator": _validate_operator, "extender": _validate_extender,
            "router": _validate_router,
            "sidecar": _validate_sidecar, "node-agent": _validate_sidecar,
            "device-plugin": _validate_device_plugin}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_container_args_parse_with_the_cli(command: str) -> None:
    from joulepool.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    # every command the chart runs must exist: a missing one is a broken chart, not a skip
    assert command in sub.choices, (  # type: ignore[operator]
        f"the chart runs `joulepool {command}` but the CLI has no such command"
    )
    bad = []
    for where, args in COMMANDS[command]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                parsed = parser.parse_args(args)
            except SystemExit:
                bad.append(f"{where}: {' '.join(args)}\n  {err.getvalue().strip()}")
                continue
        try:
            VALIDATE.get(command, lambda _: None)(parsed)
        except Exception as exc:  # UsageError, SettingsError, ValueError
            bad.append(f"{where}: {' '.join(args)}\n  {type(exc).__name__}: {exc}")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------
# RBAC of the chart's own components (the operator's is in test_chart_sync.py)
# --------------------------------------------------------------------------
def test_plan_configmap_is_the_only_configmap_readers_see(default_render: Rendered) -> None:
    from joulepool.api.plan import PLAN_CONFIGMAP

    for component in ("extender", "node-agent"):
        (rule,) = [r for r in default_render.get("Role", name(component))["rules"]
                   if "configmaps" in r["resources"]]
        assert rule["resourceNames"] == [PLAN_CONFIGMAP]
        assert set(rule["verbs"]) <= {"get", "list", "watch"}


def test_the_only_writes_outside_the_operator(default_render: Rendered) -> None:
    """Apart from the operator's rules, two writes: the node agent patching GPUProfile
    status (measured J/token) and InferencePool status (observed prompt lengths). (Leases
    are the scheduler's own and each router replica's own in the release namespace;
    events come from the stock system:kube-scheduler role.)"""
    writes = []
    for kind in ("ClusterRole", "Role"):
        for role in default_render.all(kind):
            if role["metadata"]["name"] == name("operator"):
                continue
            for rule in role["rules"]:
                verbs = set(rule["verbs"]) - {"get", "list", "watch"}
                if verbs:
                    writes.append((role["metadata"]["name"], tuple(rule["resources"]),
                                   tuple(sorted(verbs))))
    assert sorted(writes) == [
        (name("node-agent"), ("gpuprofiles/status",), ("patch",)),
        (name("node-agent"), ("inferencepools/status",), ("patch",)),
        (name("router-replicas"), ("leases",), ("create", "patch")),
        (name("scheduler") + "-leader-election", ("leases",), ("create",)),
        (name("scheduler") + "-leader-election", ("leases",), ("update",)),
    ]
    assert not any("*" in v for r in default_render.all("ClusterRole") for rule in r["rules"]
                   for v in rule["verbs"] + rule["resources"] + rule["apiGroups"])
