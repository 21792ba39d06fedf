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
        "verbs": ["get", "patch"],
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
