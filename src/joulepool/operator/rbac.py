"""The exact RBAC rules ``joulepool operator`` needs: the one place they live.

The Helm chart renders :data:`CLUSTER_RULES` into the operator's ClusterRole
and :data:`NAMESPACE_RULES` into a Role in the operator's own namespace; a test
compares the chart with these lists.  ``joulepool operator rbac`` prints them.
"""

from __future__ import annotations

from typing import Any

#: ClusterRole rules (pools and Deployments live in any watched namespace).
CLUSTER_RULES: list[dict[str, Any]] = [
    # kopf watches InferencePools and patches them: finalizer, its
    # last-handled-configuration annotation; the operator patches the status.
    {
        "apiGroups": ["joulepool.dev"],
        "resources": ["inferencepools"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    {
        "apiGroups": ["joulepool.dev"],
        "resources": ["inferencepools/status"],
        "verbs": ["patch"],
    },
    # Read only: kept in kopf indexes, never written.
    {
        "apiGroups": ["joulepool.dev"],
        "resources": ["gpuprofiles", "energypolicies"],
        "verbs": ["get", "list", "watch"],
    },
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
    # The serving Deployments of every pool (owned by the pool).
    {
        "apiGroups": ["apps"],
        "resources": ["deployments"],
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    # kopf.event / kopf.warn post core Events next to the object (any namespace).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]

#: Role rules in the operator's namespace: the plan ConfigMap.
NAMESPACE_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "verbs": ["get", "create", "patch"],
    },
]


def rbac_objects(
    namespace: str = "joulepool-system",
    service_account: str = "joulepool-operator",
    name: str = "joulepool-operator",
) -> list[dict[str, Any]]:
    """ClusterRole + binding and Role + binding for the operator's service account."""
    subject = [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]
    labels = {"app.kubernetes.io/name": "joulepool", "app.kubernetes.io/component": "operator"}
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": name, "labels": labels},
         "rules": [dict(r) for r in CLUSTER_RULES]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": name, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": name},
         "subjects": subject},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": name, "namespace": namespace, "labels": labels},
         "rules": [dict(r) for r in NAMESPACE_RULES]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": name, "namespace": namespace, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": subject},
    ]


def rbac_manifest(
    namespace: str = "joulepool-system",
    service_account: str = "joulepool-operator",
    name: str = "joulepool-operator",
) -> str:
    """The RBAC objects as a multi-document YAML string (``joulepool operator rbac``)."""
    import yaml

    return yaml.safe_dump_all(rbac_objects(namespace, service_account, name), sort_keys=False)
