"""Least privilege, checked: every RBAC verb the chart grants is used by code, and every
API call the code makes is granted.

:data:`USES` maps each (ServiceAccount, API group, resource, verb) that joulepool needs to
the source that makes the call (a file and a pattern found in it). The tests fail on a
verb the chart grants that no entry explains, on an entry whose call is gone from the
code, on an entry the chart does not grant, and (for the components on the kubernetes
client) on a client call in a component's modules that has no entry. The real-API suite
(tests/realk8s) runs the components on these ServiceAccounts and finds no 403.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from chartlib import ROOT, Rendered, name, render_raw, rendered

SRC = ROOT / "src" / "joulepool"

Grant = tuple[str, str, str, str]  # (service account component, API group, resource, verb)

#: (component, group, resource, verb) -> (file under src/joulepool or the chart, regex)
USES: dict[Grant, tuple[str, str]] = {}


def _use(components: tuple[str, ...], group: str, resource: str, verbs: str, where: str,
         pattern: str) -> None:
    for component in components:
        for verb in verbs.split():
            USES[(component, group, resource, verb)] = (where, pattern)


# -- extender (scheduler pod) and router: one watch and policy code (kube/) -----------------
_SERVICES = ("scheduler", "router")
_use(_SERVICES, "", "nodes", "list watch", "kube/watch.py",
     r"kube_list_watch\(core\.list_node")
_use(_SERVICES, "", "pods", "list watch", "kube/watch.py",
     r"core\.list_pod_for_all_namespaces")
_use(_SERVICES, "", "configmaps", "list watch", "kube/watch.py",
     r"core\.list_namespaced_config_map, timeout_s, namespace=namespace,\s*"
     r"field_selector=f\"metadata\.name=")
_use(_SERVICES, "joulepool.dev", "energypolicies", "get", "kube/policy.py",
     r"get_cluster_custom_object\(\s*GROUP, VERSION, ENERGYPOLICIES")
# the router replicas' counts, one Lease each (kube/leases.py)
_use(("router",), "coordination.k8s.io", "leases", "create", "kube/leases.py",
     r"self\.api\.create_namespaced_lease\(self\.namespace, body\)")
_use(("router",), "coordination.k8s.io", "leases", "patch", "kube/leases.py",
     r"self\.api\.patch_namespaced_lease\(self\.replica, self\.namespace, body\)")
_use(("router",), "coordination.k8s.io", "leases", "list", "kube/leases.py",
     r"self\.api\.list_namespaced_lease\(\s*self\.namespace, label_selector=")
# kube-scheduler itself (not our code): leader election on its own lease
_use(("scheduler",), "coordination.k8s.io", "leases", "create get update",
     "charts/joulepool/templates/scheduler-configmap.yaml", r"leaderElect: \{\{ \$le\.enabled")

# -- node agent ------------------------------------------------------------------------------
_use(("node-agent",), "", "pods", "list", "nodeagent/discovery.py",
     r"list_pod_for_all_namespaces\(\s*field_selector=f\"spec\.nodeName=")
_use(("node-agent",), "", "configmaps", "get", "nodeagent/plansource.py",
     r"read_namespaced_config_map\(self\.name")
_use(("node-agent",), "joulepool.dev", "energypolicies", "get", "nodeagent/plansource.py",
     r"get_cluster_custom_object\(GROUP, VERSION, ENERGYPOLICIES")
_use(("node-agent",), "joulepool.dev", "gpuprofiles", "get", "nodeagent/publisher.py",
     r"get_cluster_custom_object\(GROUP, VERSION, PLURAL")
_use(("node-agent",), "joulepool.dev", "gpuprofiles", "list", "nodeagent/publisher.py",
     r"list_cluster_custom_object\(\s*GROUP, VERSION, PLURAL")
_use(("node-agent",), "joulepool.dev", "gpuprofiles/status", "patch",
     "nodeagent/publisher.py", r"patch_cluster_custom_object_status\(GROUP, VERSION, PLURAL")
_use(("node-agent",), "joulepool.dev", "inferencepools", "get", "nodeagent/publisher.py",
     r"get_namespaced_custom_object\(\s*GROUP, VERSION, namespace, INFERENCEPOOLS")
_use(("node-agent",), "joulepool.dev", "inferencepools/status", "patch",
     "nodeagent/publisher.py",
     r"patch_namespaced_custom_object_status\(\s*GROUP, VERSION, namespace, INFERENCEPOOLS")
# the uninstall hook's wait for the agents to be gone
_use(("node-agent-reset",), "", "pods", "list", "nodeagent/uninstall.py",
     r"list_namespaced_pod\(")
_use(("node-agent-reset",), "apps", "daemonsets/status", "get", "nodeagent/uninstall.py",
     r"read_namespaced_daemon_set_status\(")

# -- operator (kopf watches and indexes, its own aiohttp client for writes) ----------------
_OP = ("operator",)
_use(_OP, "joulepool.dev", "inferencepools", "list watch", "operator/handlers.py",
     r"@kopf\.index\(\*POOLS")
_use(_OP, "joulepool.dev", "inferencepools", "patch", "operator/handlers.py",
     r"@kopf\.on\.delete\(\*POOLS")  # kopf's finalizer and progress annotations
_use(_OP, "joulepool.dev", "inferencepools", "get", "operator/kube.py",
     r"current = await client\.get\(base\)")  # re-read after a 409 on the status patch
_use(_OP, "joulepool.dev", "inferencepools/status", "patch", "operator/planning.py",
     r"patch_merge_retrying\(self\.client, path, make_patch")
_use(_OP, "joulepool.dev", "energypolicies/status", "patch", "operator/planning.py",
     r"path_for\(API_VERSION, ENERGYPOLICIES, None, POLICY_NAME, \"status\"\)")
_use(_OP, "joulepool.dev", "gpuprofiles/status", "patch", "operator/drift.py",
     r"path_for\(API_VERSION, GPUPROFILES, None, name, \"status\"\)")
_use(_OP, "joulepool.dev", "gpuprofiles", "list watch", "operator/handlers.py",
     r"@kopf\.index\(\*PROFILES")
_use(_OP, "joulepool.dev", "energypolicies", "list watch", "operator/handlers.py",
     r"@kopf\.index\(\*POLICIES")
_use(_OP, "", "nodes", "list watch", "operator/handlers.py", r"@kopf\.index\(\*NODES")
_use(_OP, "apps", "deployments", "list watch", "operator/handlers.py",
     r"@kopf\.index\(\*DEPLOYMENTS")
_use(_OP, "apps", "deployments", "create patch", "operator/deployments.py",
     r"await self\.client\.apply\(_path\(k\), body\)")  # server-side apply (may create)
_use(_OP, "apps", "deployments", "delete", "operator/deployments.py",
     r"await self\.client\.delete\(_path\(k\)\)")
_use(_OP, "apps", "deployments", "get", "operator/deployments.py",
     r"patch_merge_retrying\(self\.client, _path\(k\)")  # re-read after a 409
_use(_OP, "inference.networking.k8s.io", "inferencepools", "create patch",
     "operator/gateway.py",
     r"await self\.client\.apply\(path_for\(GIE_API_VERSION, GIE_POOL_PLURAL")
_use(_OP, "", "events", "create", "operator/handlers.py", r"kopf\.warn\(body")
_use(_OP, "", "configmaps", "get", "operator/planning.py",
     r"await self\.client\.get\(self\.configmap_path\)")
_use(_OP, "", "configmaps", "create patch", "operator/planning.py",
     r"await self\.client\.apply\(self\.configmap_path")
_use(_OP, "", "secrets", "get", "carbon/feed.py",
     r"read_object\(ctx0, f\"/api/v1/namespaces/\{ns\}/secrets/")

#: roles the chart binds but does not define: the stock kube-scheduler's own needs
EXTERNAL_ROLES = {
    ("scheduler", "ClusterRole", "system:kube-scheduler"),
    ("scheduler", "ClusterRole", "system:volume-scheduler"),
    ("scheduler", "Role", "extension-apiserver-authentication-reader"),
}

#: renders that together turn on every component and every optional rule
RENDERS = {
    "default": None,
    "fake-gpus": {"fakeGPUs": {"enabled": True}},
    "carbon": {"operator": {"carbonConfigMaps": [{"namespace": "kube-system",
                                                  "name": "carbonintensity"}]}},
}
_use(_OP, "", "configmaps", "get", "carbon/providers.py",
     r"read_object\(ctx, f\"/api/v1/namespaces/\{ref\.namespace\}/configmaps/")


def _component(sa: str) -> str:
    assert sa.startswith(name("")), sa
    return sa[len(name("")):]


def granted(r: Rendered) -> tuple[set[Grant], set[tuple[str, str, str]]]:
    """Every (component, group, resource, verb) the render grants, and the external roles
    it binds (component, kind, name)."""
    roles = {(o["kind"], o["metadata"]["name"]): o for o in r.objects()
             if o["kind"] in ("Role", "ClusterRole")}
    grants: set[Grant] = set()
    external: set[tuple[str, str, str]] = set()
    for b in r.objects():
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = b["roleRef"]
        for subject in b["subjects"]:
            assert subject["kind"] == "ServiceAccount", subject
            component = _component(subject["name"])
            role = roles.get((ref["kind"], ref["name"]))
            if role is None:
                external.add((component, ref["kind"], ref["name"]))
                continue
            for rule in role["rules"]:
                assert "nonResourceURLs" not in rule
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            assert verb != "*" and resource != "*" and group != "*", rule
                            grants.add((component, group, resource, verb))
    return grants, external


@pytest.fixture(scope="module")
def all_grants() -> tuple[set[Grant], set[tuple[str, str, str]]]:
    grants: set[Grant] = set()
    external: set[tuple[str, str, str]] = set()
    for key, values in RENDERS.items():
        r = rendered("default") if values is None else Rendered(render_raw(values))
        g, e = granted(r)
        grants |= g
        external |= e
        assert key
    return grants, external


def _source(where: str) -> str:
    path = ROOT / where if where.startswith("charts/") else SRC / where
    return path.read_text()


def test_every_granted_verb_is_used(all_grants: tuple[set[Grant], Any]) -> None:
    unused = sorted(g for g in all_grants[0] if g not in USES)
    assert not unused, f"granted, but no code uses them: {unused}"


def test_every_use_is_in_the_code() -> None:
    stale = []
    for grant, (where, pattern) in sorted(USES.items()):
        if not re.search(pattern, _source(where)):
            stale.append(f"{grant}: /{pattern}/ not in {where}")
    assert not stale, "\n".join(stale)


def test_every_use_is_granted(all_grants: tuple[set[Grant], Any]) -> None:
    missing = sorted(g for g in USES if g not in all_grants[0])
    assert not missing, f"used by the code, not granted by the chart: {missing}"


def test_external_roles_are_the_stock_schedulers(all_grants: tuple[Any, set[Any]]) -> None:
    assert all_grants[1] == EXTERNAL_ROLES


#: kubernetes-client method -> (API group, resource, verb), for the calls the modules of
#: each client-based component make (the operator uses kopf and raw paths: USES above)
CLIENT_CALLS: dict[str, tuple[str, str, str]] = {
    "list_node": ("", "nodes", "list"),
    "list_pod_for_all_namespaces": ("", "pods", "list"),
    "list_namespaced_pod": ("", "pods", "list"),
    "list_namespaced_config_map": ("", "configmaps", "list"),
    "read_namespaced_config_map": ("", "configmaps", "get"),
    "read_namespaced_daemon_set_status": ("apps", "daemonsets/status", "get"),
    "read_node": ("", "nodes", "get"),
    "create_namespaced_lease": ("coordination.k8s.io", "leases", "create"),
    "patch_namespaced_lease": ("coordination.k8s.io", "leases", "patch"),
    "list_namespaced_lease": ("coordination.k8s.io", "leases", "list"),
}
#: ClusterState methods that share a name with a client method (the cache, not the API)
CACHE_METHODS = {"delete_node", "delete_pod"}


def _api_methods() -> set[str]:
    from kubernetes import client

    names: set[str] = set()
    for api in (client.CoreV1Api, client.AppsV1Api, client.CustomObjectsApi,
                client.CoordinationV1Api):
        names |= {n for n in dir(api) if n.startswith(
            ("list_", "read_", "create_", "patch_", "replace_", "delete_", "get_"))
            and not n.endswith("_with_http_info") and not n.startswith("get_api_")}
    return names - CACHE_METHODS


#: modules per component whose kubernetes-client calls must all be in USES
MODULES = {
    "scheduler": ["kube/watch.py", "kube/policy.py", "kube/service.py", "extender/app.py"],
    "router": ["kube/watch.py", "kube/policy.py", "kube/service.py", "router/app.py",
               "kube/leases.py", "router/replicas.py"],
    "node-agent": ["nodeagent/discovery.py", "nodeagent/plansource.py",
                   "nodeagent/publisher.py", "nodeagent/runner.py", "nodeagent/agent.py"],
    "node-agent-reset": ["nodeagent/uninstall.py"],
}


@pytest.mark.parametrize("component", sorted(MODULES))
def test_every_client_call_has_a_grant(component: str) -> None:
    """A kubernetes-client call added to a component's modules needs an entry in USES
    (and so a grant), or this fails naming it."""
    api_methods = _api_methods()
    unexplained = []
    for module in MODULES[component]:
        calls = set(re.findall(r"\.([a-z_]+)\(", _source(module))) & api_methods
        for call in sorted(calls):
            if call in CLIENT_CALLS:
                group, resource, verb = CLIENT_CALLS[call]
            elif "custom_object" in call:
                verb = call.split("_")[0]
                group, resource = "joulepool.dev", "*"  # which resource: the entry's pattern
            else:
                unexplained.append(f"{module}: {call} (add it to CLIENT_CALLS and USES)")
                continue
            ok = any(c == component and g == group and v == verb
                     and (resource == "*" or r == resource) for (c, g, r, v) in USES)
            if not ok:
                unexplained.append(f"{module}: {call} -> {group}/{resource} {verb}")
    assert not unexplained, "\n".join(unexplained)


def test_deliberately_absent(all_grants: tuple[set[Grant], Any]) -> None:
    """No component may read Secrets but the operator (carbon source credentials), and
    none but the operator writes outside its own status, its own Leases (the router's
    replica counts, kube-scheduler's leader election) excepted."""
    grants = all_grants[0]
    assert {c for (c, _g, r, _v) in grants if r == "secrets"} == {"operator"}
    writes = {(c, r) for (c, _g, r, v) in grants
              if v in ("create", "update", "patch", "delete") and c != "operator"}
    assert writes == {("node-agent", "gpuprofiles/status"),
                      ("node-agent", "inferencepools/status"), ("scheduler", "leases"),
                      ("router", "leases")}


def test_uses_table_paths_exist() -> None:
    for where, _ in USES.values():
        assert (ROOT / where if where.startswith("charts/") else SRC / where).is_file(), where
    assert Path(__file__).name in {"test_chart_rbac_usage.py"}
