"""The exact RBAC rules ``joulepool operator`` needs: the one place they live.

The Helm chart renders :data:`CLUSTER_RULES` into the operator's ClusterRole
and :data:`NAMESPACE_RULES` into a Role in the operator's own namespace; a test
compares the chart with these lists.  ``joulepool operator rbac`` prints them.
"""

from __future__ import annotations

from typing import Any

from joulepool.api.contract import (
    COMPONENT_LABEL,
    DEFAULT_NAMESPACE,
    ENERGYPOLICIES,
    GIE_GROUP,
    GIE_POOL_PLURAL,
    GPUPROFILES,
    GROUP,
    INFERENCEPOOLS,
    NAME_LABEL,
)

#: ClusterRole rules: pools, Deployments and Events live in any watched namespace;
#: nodes and joulepool's cluster-scoped resources are cluster-wide.
CLUSTER_RULES: list[dict[str, Any]] = [
    # kopf lists/watches pools and patches them (its finalizer and its annotations
    # joulepool.dev/last-handled-configuration and handler progress); the operator
    # re-reads one (get) after a 409 on its status patch.
    {
        "apiGroups": [GROUP],
        "resources": [INFERENCEPOOLS],
        "verbs": ["get", "list", "watch", "patch"],
    },
    # The planning loop writes every pool's status (merge patch).
    {
        "apiGroups": [GROUP],
        "resources": ["inferencepools/status"],
        "verbs": ["patch"],
    },
    # The planning loop writes EnergyPolicy default's status: its live carbon sources.
    {
        "apiGroups": [GROUP],
        "resources": ["energypolicies/status", f"{GPUPROFILES}/status"],
        "verbs": ["patch"],
    },
    # Read only, kept in kopf indexes: never written, never fetched one by one.
    {
        "apiGroups": [GROUP],
        "resources": [GPUPROFILES, ENERGYPOLICIES],
        "verbs": ["list", "watch"],
    },
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]},
    # The serving Deployments (owned by their pool): watched for readiness, listed after a
    # watch gap, written by server-side apply (patch; create when the apply creates one),
    # scaled to 0 (patch), deleted when no longer planned; get re-reads after a 409.
    {
        "apiGroups": ["apps"],
        "resources": ["deployments"],
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    # GIE pools (operator.gateway): one InferencePool of inference.networking.k8s.io per
    # pool, written by server-side apply (patch; create when the apply creates one).
    # Whether GIE's CRD is served is read from API discovery (open to every user).
    {
        "apiGroups": [GIE_GROUP],
        "resources": [GIE_POOL_PLURAL],
        "verbs": ["create", "patch"],
    },
    # kopf.warn / kopf's failure reports: core/v1 Events next to the object (any namespace);
    # about cluster-scoped objects (GPUProfile, EnergyPolicy, Node, drift): in `default`
    # (operator.events).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
# Deliberately absent:
# * kopfpeerings / clusterkopfpeerings (kopf.dev, zalando.org): peering is disabled
#   (standalone=True; one replica, see joulepool.operator);
# * customresourcedefinitions and namespaces: settings.scanning.disabled=True, kopf finds
#   the resources once through API discovery (/apis, allowed to every authenticated user)
#   and treats --watch-namespace values as exact names;
# * leases: no leader election (kopf has none);
# * pods: readiness comes from the Deployments' status.readyReplicas.

#: Role rules in the operator's own namespace: the plan ConfigMap ``joulepool-plan``
#: (get: read the last published version on start; create; patch: new versions).
NAMESPACE_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "verbs": ["get", "create", "patch"],
    },
    # Credentials of the live carbon sources (EnergyPolicy carbon[].source.tokenSecretRef),
    # read one by one when a source is fetched; a Secret elsewhere needs a Role there.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
]


def rbac_objects(
    namespace: str = DEFAULT_NAMESPACE,
    service_account: str = "joulepool-operator",
    name: str = "joulepool-operator",
) -> list[dict[str, Any]]:
    """ClusterRole + binding and Role + binding for the operator's service account."""
    subject = [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]
    labels = {NAME_LABEL: "joulepool", COMPONENT_LABEL: "operator"}
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
    namespace: str = DEFAULT_NAMESPACE,
    service_account: str = "joulepool-operator",
    name: str = "joulepool-operator",
) -> str:
    """The RBAC objects as a multi-document YAML string (``joulepool operator rbac``)."""
    import yaml

    return yaml.safe_dump_all(rbac_objects(namespace, service_account, name), sort_keys=False)
