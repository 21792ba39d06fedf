"""Pure translations between Kubernetes objects and the operator's view of them.

No I/O (kopf only for its pure ``adopt`` helper): every function here takes
dicts/models and returns dicts/models, so the unit tests cover them without an
API server.  The
planning itself (problem, solve, per-pool outcomes) lives in
:mod:`joulepool.pooling` and :mod:`joulepool.core.planner`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from pydantic import ValidationError

from joulepool.api.contract import (
    DEFAULT_SITE,
    ENGINE_LABEL,
    FINALIZER,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    LATEST_PLAN_FEASIBLE_ANNOTATION,
    LATEST_PLAN_MESSAGE_ANNOTATION,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MODE_LABEL,
    PLACEMENT_LABEL,
    PLAN_FEASIBLE_ANNOTATION,
    PLAN_GENERATED_AT_ANNOTATION,
    PLAN_VERSION_ANNOTATION,
    PLAN_VERSION_LABEL,
    POOL_LABEL,
    PORT_ANNOTATION,
    REGION_LABEL,
    SERVED_MODEL_NAME_FLAG,
    SINGLE_SERVED_NAME_ENGINES,
    SPEC_HASH_ANNOTATION,
)
from joulepool.api.load import ResourceError, from_validation_error
from joulepool.api.models import (
    API_VERSION,
    EnergyPolicy,
    EnergyPolicySpec,
    GPUProfile,
    GPUProfileStatus,
    InferencePool,
    InferencePoolStatus,
)
from joulepool.api.plan import PlanDocument, PlannedPool, pool_key
from joulepool.api.quantity import node_resource_count
from joulepool.core.planner import PlanNode
from joulepool.core.problem import node_from_label
from joulepool.operator.config import FIELD_MANAGER
from joulepool.pooling import PoolOutcome

#: node affinity on the node's name (``matchFields``: exact even where the
#: ``kubernetes.io/hostname`` label differs from the Node's name)
NODE_NAME_FIELD = "metadata.name"
REQUIRED_AFFINITY = "requiredDuringSchedulingIgnoredDuringExecution"
MAX_LABEL_VALUE = 63

# condition types
PLANNED, READY, INFEASIBLE, INVALID = "Planned", "Ready", "Infeasible", "Invalid"
CONDITION_TYPES = (PLANNED, READY, INFEASIBLE, INVALID)


# ---------------------------------------------------------------------------
# InferencePools
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolEntry:
    """One InferencePool as the operator sees it: identity, parsed spec or the error."""

    key: str
    namespace: str
    name: str
    uid: str | None
    generation: int | None
    deleting: bool
    pool: InferencePool | None  # the validated resource, None when invalid
    error: str | None  # message naming the field, when invalid
    field: str | None
    status: Mapping[str, Any]  # current status as last seen from the API
    finalized: bool = False  # carries the operator's finalizer (kopf has adopted it)
    labels: Mapping[str, str] = dc_field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.pool is not None

    def ref(self) -> dict[str, Any]:
        """A minimal body for events (kopf.warn) about this pool."""
        return {
            "apiVersion": API_VERSION, "kind": "InferencePool",
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid,
                         "labels": dict(self.labels)},
        }


def _meta_subset(meta: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("name", "namespace", "generation", "labels", "annotations", "uid")
    return {k: meta[k] for k in keep if meta.get(k) is not None}


def parse_pool(body: Mapping[str, Any]) -> PoolEntry:
    """Validate an InferencePool object (as watched) into a :class:`PoolEntry`.

    Validation is the pydantic model's (the same the CRD schema is generated
    from) plus what a schema cannot say: the pool label must fit a label value,
    and a non-empty pod template must be a pod template.
    """
    meta = body.get("metadata") or {}
    namespace = str(meta.get("namespace") or "default")
    name = str(meta.get("name") or "")
    key = pool_key(namespace, name)
    doc = {
        "apiVersion": body.get("apiVersion", API_VERSION),
        "kind": body.get("kind", "InferencePool"),
        "metadata": {**_meta_subset(meta), "namespace": namespace},
        "spec": body.get("spec"),
    }
    pool: InferencePool | None = None
    error: ResourceError | None = None
    try:
        pool = InferencePool.model_validate(doc)
        error = _extra_checks(pool, key)
    except ValidationError as exc:
        error = from_validation_error(exc)
    if error is not None:
        pool = None
    status = body.get("status")
    return PoolEntry(
        key=key, namespace=namespace, name=name, uid=meta.get("uid"),
        generation=meta.get("generation"), deleting=bool(meta.get("deletionTimestamp")),
        pool=pool, error=str(error) if error else None,
        field=error.field if error else None,
        status=status if isinstance(status, Mapping) else {},
        finalized=FINALIZER in (meta.get("finalizers") or ()),
        labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
    )


def _extra_checks(pool: InferencePool, key: str) -> ResourceError | None:
    if len(key) > MAX_LABEL_VALUE:
        return ResourceError(
            f"namespace + '.' + name is {len(key)} characters; the pool label "
            f"{POOL_LABEL} allows {MAX_LABEL_VALUE}", "metadata.name")
    tpl = pool.spec.template
    if not tpl:
        return None
    spec = tpl.get("spec")
    if spec is None:
        return None if set(tpl) <= {"metadata"} else ResourceError(
            "a pod template has only 'metadata' and 'spec'", "spec.template")
    if not isinstance(spec, Mapping):
        return ResourceError("must be a pod spec (a mapping)", "spec.template.spec")
    containers = spec.get("containers", [])
    if not isinstance(containers, list):
        return ResourceError("must be a list", "spec.template.spec.containers")
    for i, c in enumerate(containers):
        where = f"spec.template.spec.containers[{i}]"
        if not isinstance(c, Mapping):
            return ResourceError("must be a container (a mapping)", where)
        if not c.get("name") or not c.get("image"):
            return ResourceError("a container needs 'name' and 'image'", where)
    return None


def has_containers(pool: InferencePool) -> bool:
    spec = pool.spec.template.get("spec") or {}
    return bool(spec.get("containers"))


# ---------------------------------------------------------------------------
# Nodes, GPU profiles, energy policy
# ---------------------------------------------------------------------------
#: taints the node lifecycle controller puts on a node that stopped reporting or is not ready
DEAD_NODE_TAINTS = frozenset({"node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready"})
_BLOCKING_EFFECTS = frozenset({"NoSchedule", "NoExecute"})


def node_schedulable(body: Mapping[str, Any]) -> bool:
    """False for a node no new pod can land on: cordoned, not Ready, or tainted dead.

    Cordoned: ``spec.unschedulable``. Not Ready: a ``Ready`` condition whose
    status is not ``True`` (``False`` or ``Unknown``: the kubelet stopped
    reporting); a node with no Ready condition at all has not been judged and
    counts as ready. Dead: a ``node.kubernetes.io/unreachable`` or
    ``node.kubernetes.io/not-ready`` taint with effect NoSchedule or NoExecute.
    """
    spec = body.get("spec") or {}
    if spec.get("unschedulable"):
        return False
    for t in spec.get("taints") or ():
        if (isinstance(t, Mapping) and t.get("key") in DEAD_NODE_TAINTS
                and t.get("effect") in _BLOCKING_EFFECTS):
            return False
    for c in (body.get("status") or {}).get("conditions") or ():
        if isinstance(c, Mapping) and c.get("type") == "Ready":
            return str(c.get("status")) == "True"
    return True


def node_from_body(body: Mapping[str, Any]) -> PlanNode | None:
    """The GPU node as the planner sees it, or None: no GPU label, no GPUs, an unreadable
    GPU quantity, or not schedulable (cordoned, not Ready, unreachable / not-ready taint:
    :func:`node_schedulable`). :func:`read_node` also says why a GPU node is unusable."""
    return read_node(body)[0]


def read_node(body: Mapping[str, Any]) -> tuple[PlanNode | None, str | None]:
    """(:func:`node_from_body`, the error that made a GPU-labelled node unusable or None).

    GPUs: ``status.allocatable`` of ``nvidia.com/gpu``, ``capacity`` when the node
    reports none there (:func:`joulepool.api.quantity.node_resource_count`, the parser
    the extender and router use too); a quantity that is not one (``1e999``, ``x``) is
    the error, never an exception out of the watch handler."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    product = labels.get(GPU_PRODUCT_LABEL)
    if not product:
        return None, None
    try:
        gpus = node_resource_count(body.get("status") or {}, GPU_RESOURCE)
    except ValueError as exc:
        return None, f"GPU count unreadable, node left out of the plan: {exc}"
    if gpus <= 0 or not node_schedulable(body):
        return None, None
    site = labels.get(REGION_LABEL) or DEFAULT_SITE
    return node_from_label(str(meta.get("name")), str(site), str(product), gpus), None


def parse_profile(body: Mapping[str, Any]) -> GPUProfile:
    """Validate a GPUProfile; raises ResourceError naming the field.

    The node agents' ``status.measured`` is kept (the planner feeds it back,
    core.feedback); a status that does not validate is dropped, never the profile."""
    try:
        profile = GPUProfile.model_validate(_resource_doc(body, "GPUProfile"))
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    try:
        status = GPUProfileStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return profile
    return profile.model_copy(update={"status": status})


def parse_policy(body: Mapping[str, Any]) -> EnergyPolicySpec:
    """Validate an EnergyPolicy; raises ResourceError naming the field."""
    try:
        return EnergyPolicy.model_validate(_resource_doc(body, "EnergyPolicy")).spec
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _resource_doc(body: Mapping[str, Any], kind: str) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": body.get("apiVersion", API_VERSION),
        "kind": body.get("kind", kind),
        "metadata": _meta_subset(body.get("metadata") or {}),
    }
    if body.get("spec") is not None:
        doc["spec"] = body["spec"]
    return doc


# ---------------------------------------------------------------------------
# The published plan
# ---------------------------------------------------------------------------
def plan_without(doc: PlanDocument, keep: Iterable[str]) -> PlanDocument:
    """The plan document restricted to the pools in ``keep`` (others' GPUs released)."""
    keep_set = set(keep)
    out = doc.model_copy(deep=True)
    out.pools = {k: p for k, p in out.pools.items() if k in keep_set}
    for node in out.nodes.values():
        node.pools = {k: g for k, g in node.pools.items() if k in keep_set}
    return out


def plan_content(doc: PlanDocument) -> str:
    """The plan without version and time: two plans with equal content serve the same."""
    data = json.loads(doc.to_json())
    data.pop("version", None)
    data.pop("generatedAt", None)
    return json.dumps(data, sort_keys=True)


def plan_configmap(
    doc: PlanDocument, name: str, namespace: str, latest_feasible: bool, latest_message: str,
) -> dict[str, Any]:
    """The ConfigMap body publishing ``doc`` (version in a label and an annotation too)."""
    from joulepool.api.plan import PLAN_KEY

    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                MANAGED_BY_LABEL: MANAGED_BY,
                PLAN_VERSION_LABEL: str(doc.version),
            },
            "annotations": {
                PLAN_VERSION_ANNOTATION: str(doc.version),
                PLAN_GENERATED_AT_ANNOTATION: doc.generated_at.isoformat()
                if doc.generated_at else "",
                PLAN_FEASIBLE_ANNOTATION: "true" if doc.feasible else "false",
                LATEST_PLAN_FEASIBLE_ANNOTATION: "true" if latest_feasible else "false",
                LATEST_PLAN_MESSAGE_ANNOTATION: latest_message[:1024],
            },
        },
        "data": {PLAN_KEY: doc.to_json()},
    }


def version_of(configmap: Mapping[str, Any] | None) -> int:
    """The plan version a published ConfigMap carries (0 if none or unreadable)."""
    if not configmap:
        return 0
    from joulepool.api.plan import PLAN_KEY

    ann = (configmap.get("metadata") or {}).get("annotations") or {}
    try:
        return int(ann.get(PLAN_VERSION_ANNOTATION, ""))
    except ValueError:
        pass
    try:
        return PlanDocument.from_json((configmap.get("data") or {}).get(PLAN_KEY, "")).version
    except ValueError:
        return 0


# ---------------------------------------------------------------------------
# Deployments
# ---------------------------------------------------------------------------
_NOT_DNS = re.compile(r"[^a-z0-9-]+")


def mode_slug(mode: str) -> str:
    """A serving mode as a DNS-label fragment: ``2xH100`` -> ``2xh100``."""
    return _NOT_DNS.sub("-", mode.lower()).strip("-") or "mode"


def deployment_name(pool_name: str, mode: str, node: str) -> str:
    """``<pool>-<mode>-<node>`` (lowercased, DNS-safe), shortened with a digest of the whole
    so it is at most 63 characters (it is also the value of :data:`PLACEMENT_LABEL`)."""
    name = f"{pool_name}-{mode_slug(mode)}-{mode_slug(node)}"
    if len(name) <= MAX_LABEL_VALUE:
        return name
    digest = hashlib.sha1(f"{pool_name}\0{mode}\0{node}".encode()).hexdigest()[:10]
    return f"{name[:52].rstrip('-')}-{digest}"


def ready_shared_instances(guest: str, doc: PlanDocument,
                           ready: Mapping[tuple[str, str], int]) -> int:
    """How many of the instances the plan shares with pool ``guest`` (other pools'
    instances listing it in ``sharedWith``) are ready. ``ready``: ready replicas by
    (namespace, Deployment name) of the host pools' Deployments (one per pool, mode and
    node: :func:`deployment_name`). A host's ready pods on a node and mode fill its planned
    instances there in the router's order (:meth:`PlannedPool.guests_by_pod`: shared
    instances first), so this counts the shared instances the router reaches, not the
    host's ready replicas elsewhere."""
    count = 0
    for host_key, host in doc.pools.items():
        if host_key == guest:
            continue
        places = sorted({(a.node, a.mode) for a in host.assignments
                         if a.instances > 0 and guest in a.shared_with})
        for node, mode in places:
            n = ready.get((host.namespace, deployment_name(host.name, mode, node)), 0)
            pods = [(f"{i:06d}", node, mode) for i in range(n)]
            count += sum(guest in guests for guests in host.guests_by_pod(pods).values())
    return count


@dataclass(frozen=True)
class DeploymentInfo:
    """A Deployment the operator owns, as last seen on the watch."""

    namespace: str
    name: str
    pool: str  # pool key
    mode: str
    replicas: int
    ready_replicas: int
    spec_hash: str
    #: another field manager owns a field under ``spec`` (a hand-made scale or edit)
    foreign_spec: bool = False
    resource_version: str = ""

    @property
    def ready_planned(self) -> int:
        """Its ready replicas, at most the replicas it asks for (a scale-down's pods
        still ready are not counted)."""
        return min(self.ready_replicas, self.replicas)


def foreign_spec_owner(meta: Mapping[str, Any]) -> bool:
    """True when a field manager other than the operator's owns a field under ``spec``
    (``metadata.managedFields``; status writers excluded): someone scaled or edited it."""
    for entry in meta.get("managedFields") or ():
        if not isinstance(entry, Mapping) or entry.get("manager") == FIELD_MANAGER:
            continue
        if entry.get("subresource") == "status":
            continue
        if "f:spec" in (entry.get("fieldsV1") or {}):
            return True
    return False


def deployment_from_body(body: Mapping[str, Any]) -> DeploymentInfo:
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = body.get("status") or {}
    spec = body.get("spec") or {}
    return DeploymentInfo(
        namespace=str(meta.get("namespace") or "default"),
        name=str(meta.get("name")),
        pool=str(labels.get(POOL_LABEL, "")),
        mode=str(labels.get(MODE_LABEL, "")),
        replicas=int(spec.get("replicas") or 0),
        ready_replicas=int(status.get("readyReplicas") or 0),
        spec_hash=str((meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION, "")),
        foreign_spec=foreign_spec_owner(meta),
        resource_version=str(meta.get("resourceVersion") or ""),
    )


def drifted(seen: DeploymentInfo, desired_hash: str, replicas: int) -> bool:
    """The live Deployment differs from what the operator would apply."""
    return seen.spec_hash != desired_hash or seen.replicas != replicas or seen.foreign_spec


def _gpu_container_index(containers: Sequence[Mapping[str, Any]]) -> int:
    """The container that gets the GPUs: one already asking for them, else the first."""
    for i, c in enumerate(containers):
        res = c.get("resources") or {}
        if GPU_RESOURCE in (res.get("limits") or {}) or GPU_RESOURCE in (res.get("requests") or {}):
            return i
    return 0


def _require_node(spec: dict[str, Any], node: str) -> None:
    """Add a required nodeAffinity: Node ``metadata.name`` In ``[node]``, ANDed with the
    template's own required terms (added to each of them, since terms are ORed).

    One value only: kube-apiserver rejects a ``matchFields`` ``In`` with several values
    (422, "must be only one value when 'operator' is 'In' or 'NotIn' for node field
    selector"); a mode planned on several nodes gets one Deployment per node instead.
    """
    expr = {"key": NODE_NAME_FIELD, "operator": "In", "values": [node]}
    affinity = spec.get("affinity")
    affinity = dict(affinity) if isinstance(affinity, Mapping) else {}
    node_aff = affinity.get("nodeAffinity")
    node_aff = dict(node_aff) if isinstance(node_aff, Mapping) else {}
    required = node_aff.get(REQUIRED_AFFINITY)
    required = dict(required) if isinstance(required, Mapping) else {}
    terms = [dict(t) for t in required.get("nodeSelectorTerms") or () if isinstance(t, Mapping)]
    if not terms:
        terms = [{}]
    for t in terms:
        t["matchFields"] = [*(t.get("matchFields") or ()), dict(expr)]
    required["nodeSelectorTerms"] = terms
    node_aff[REQUIRED_AFFINITY] = required
    affinity["nodeAffinity"] = node_aff
    spec["affinity"] = affinity


def _wire_gpu_container(spec: dict[str, Any], entry: PoolEntry, mode: str, gpus: int) -> None:
    """``nvidia.com/gpu`` requests = limits on the GPU container, and joulepool's env."""
    containers = spec.get("containers") or []
    if not containers:
        return
    c = containers[_gpu_container_index(containers)]
    res = c.setdefault("resources", {})
    res.setdefault("limits", {})[GPU_RESOURCE] = str(gpus)
    res.setdefault("requests", {})[GPU_RESOURCE] = str(gpus)
    env = c.setdefault("env", [])
    have = {e.get("name") for e in env if isinstance(e, Mapping)}
    for k, v in (("JOULEPOOL_POOL", entry.key), ("JOULEPOOL_MODE", mode),
                 ("JOULEPOOL_GPUS", str(gpus))):
        if k not in have:
            env.append({"name": k, "value": v})


def _pass_served_names(spec: dict[str, Any], labels: Mapping[str, str],
                       names: Sequence[str]) -> None:
    """Append ``--served-model-name NAME...`` to the GPU container's args, so the engine
    answers to the model names the router sends it (vLLM takes several; an engine of
    :data:`SINGLE_SERVED_NAME_ENGINES`, by the pod label ``joulepool.dev/engine``, gets
    the first). Nothing when there are no names or the container's command or args
    name the flag already (the template's own choice stands)."""
    containers = spec.get("containers") or []
    if not names or not containers:
        return
    c = containers[_gpu_container_index(containers)]
    words = [str(w) for w in [*(c.get("command") or ()), *(c.get("args") or ())]]
    flag = SERVED_MODEL_NAME_FLAG
    if any(w == flag or w.startswith(flag + "=") for w in words):
        return
    engine = str(labels.get(ENGINE_LABEL) or "").strip().lower()
    given = list(names[:1]) if engine in SINGLE_SERVED_NAME_ENGINES else list(names)
    c["args"] = [*(c.get("args") or ()), flag, *given]


def build_deployment(
    entry: PoolEntry, pool: InferencePool, mode: str, replicas: int, gpus_per_instance: int,
    scheduler_name: str, node: str,
) -> dict[str, Any]:
    """The serving Deployment of one pool, one serving mode and one node, from
    ``spec.template``: a full object for server-side apply.

    Adopted by the pool (``kopf.adopt``: controller owner reference, garbage-collected
    with it, the pool's labels), joulepool's scheduler, the pool, mode and placement
    labels on selector and pods, ``nvidia.com/gpu`` requests = limits = the mode's GPUs
    per instance on the GPU container, replicas = the plan's instances of that mode on
    that node, and a required nodeAffinity on that Node's name: every pod lands on its
    planned node whatever the scheduler does, so the per-node shares of the plan hold
    under kube-scheduler's asynchronous binding.
    """
    name = deployment_name(entry.name, mode, node)
    template = copy.deepcopy(pool.spec.template)
    tmeta = template.setdefault("metadata", {})
    selector = {POOL_LABEL: entry.key, MODE_LABEL: mode, PLACEMENT_LABEL: name}
    tmeta["labels"] = {**(tmeta.get("labels") or {}), **selector}
    if pool.spec.port is not None:  # tells the router where requests go
        tmeta["annotations"] = {**(tmeta.get("annotations") or {}),
                                PORT_ANNOTATION: str(pool.spec.port)}
    spec = template.setdefault("spec", {})
    spec["schedulerName"] = scheduler_name
    _require_node(spec, node)
    _wire_gpu_container(spec, entry, mode, gpus_per_instance)
    _pass_served_names(spec, tmeta["labels"], pool.spec.served_model_names)
    body: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": entry.namespace,
            "labels": {**selector, MANAGED_BY_LABEL: MANAGED_BY},
            "annotations": {},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(selector)},
            # GPUs are planned to the instance: a surge pod would have no GPU to land on.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": template,
        },
    }
    kopf.adopt(body, owner=kopf.Body(cast(Any, entry.ref())))
    body["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = spec_hash(body)
    return body


def spec_hash(body: Mapping[str, Any]) -> str:
    """Fingerprint of what the operator sets on a Deployment (labels, owner, spec)."""
    meta = body.get("metadata") or {}
    data = {"labels": meta.get("labels"), "owners": meta.get("ownerReferences"),
            "spec": body.get("spec")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def desired_deployments(
    entry: PoolEntry, pool: InferencePool, planned: PlannedPool, scheduler_name: str,
) -> dict[tuple[str, str], dict[str, Any]]:
    """Every Deployment a pool's planned instances need: one per (serving mode, node)."""
    if not has_containers(pool):
        return {}
    placements: dict[tuple[str, str], tuple[int, int]] = {}
    for a in planned.assignments:
        if a.instances <= 0:
            continue
        n, g = placements.get((a.mode, a.node), (0, a.gpus_per_instance))
        placements[(a.mode, a.node)] = (n + a.instances, g)
    out = {}
    for (mode, node), (replicas, gpus) in sorted(placements.items()):
        body = build_deployment(entry, pool, mode, replicas, gpus, scheduler_name, node)
        out[(entry.namespace, body["metadata"]["name"])] = body
    return out


SCALED_DOWN = "scaled-to-zero"


def scale_down_patch() -> dict[str, Any]:
    """Merge patch that keeps a Deployment but runs none of its pods.

    The spec-hash annotation is overwritten so the full body is written again
    once the pool's mode is planned again.
    """
    return {"metadata": {"annotations": {SPEC_HASH_ANNOTATION: SCALED_DOWN}},
            "spec": {"replicas": 0}}


# ---------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------
def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class PlanView:
    """What one reconcile pass knows about the plans, for the status of any pool."""

    #: the plan in force (published); None before the first plan
    in_force: PlanDocument | None
    in_force_outcomes: Mapping[str, PoolOutcome]
    in_force_feasible: bool
    #: the newest plan attempt (may be the same plan, or an infeasible one kept back)
    latest_feasible: bool
    latest_outcomes: Mapping[str, PoolOutcome]
    latest_binding: str
    #: pools that were part of the newest attempt
    latest_pools: frozenset[str]

    @property
    def kept(self) -> bool:
        """The newest plan was infeasible and an older feasible plan is still served."""
        return not self.latest_feasible and self.in_force_feasible


def _cond(type_: str, status: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": type_, "status": "True" if status else "False",
            "reason": reason, "message": message}


def _placement(outcome: PoolOutcome | None) -> str:
    if outcome is None or not outcome.assignments:
        return "no instances"
    return ", ".join(f"{a.instances}x{a.mode}@{a.node}" for a in outcome.assignments)


def pool_conditions(
    entry: PoolEntry, view: PlanView, ready_replicas: int, deployable: bool,
    write_error: str | None = None, shared_ready: int = 0,
) -> list[dict[str, Any]]:
    """The four conditions of a pool, without transition times (see :func:`with_times`).

    ``write_error``: the API's answer to a failed write of one of the pool's Deployments
    in this pass; the pool is then not ``Planned`` (reason ``DeploymentFailed``) until a
    write succeeds, whatever the plan says. ``shared_ready``: the instances of other
    pools that serve this one and are ready (:func:`ready_shared_instances`); a pool
    is ``Ready`` when its own replicas and all of those are.
    """
    key = entry.key
    conds = []
    # Invalid: the spec as written now
    if entry.valid:
        conds.append(_cond(INVALID, False, "Valid", "spec is valid"))
    else:
        conds.append(_cond(INVALID, True, "InvalidSpec", entry.error or "invalid spec"))
    in_plan = view.in_force is not None and key in view.in_force.pools
    served = view.in_force_outcomes.get(key) if in_plan else None
    latest = view.latest_outcomes.get(key) if key in view.latest_pools else None
    stale = "" if entry.valid else "; serving the last valid spec"
    version = view.in_force.version if view.in_force is not None else 0
    # Planned: reflects the plan in force, and that its Deployments could be written
    if served is not None and write_error:
        conds.append(_cond(PLANNED, False, "DeploymentFailed",
                           f"plan v{version}: {_placement(served)}; the API refused a "
                           f"write: {write_error}"[:1024]))
    elif served is not None and view.kept:
        conds.append(_cond(PLANNED, True, "LastFeasiblePlan",
                           f"newest plan is infeasible; serving the last feasible plan "
                           f"v{version}: {_placement(served)}{stale}"))
    elif served is not None and served.planned:
        conds.append(_cond(PLANNED, True, "Planned",
                           f"plan v{version}: {_placement(served)}{stale}"))
    elif served is not None:
        conds.append(_cond(PLANNED, False, "PartiallyPlanned",
                           f"no usable feasible plan; best-effort plan v{version}: "
                           f"{_placement(served)}; {served.message}"))
    elif not entry.valid and key not in view.latest_pools:
        conds.append(_cond(PLANNED, False, "InvalidSpec", "not planned: the spec is invalid"))
    elif view.kept:
        conds.append(_cond(PLANNED, False, "NoFeasiblePlan",
                           "not in the last feasible plan; waiting for a feasible plan"))
    else:
        conds.append(_cond(PLANNED, False, "NotPlanned", "not in the plan"))
    # Infeasible: this pool's unmet demand in the newest attempt
    if latest is not None and not latest.planned:
        conds.append(_cond(INFEASIBLE, True, "UnmetDemand", latest.message))
    elif latest is not None and not view.latest_feasible:
        conds.append(_cond(INFEASIBLE, False, "Feasible",
                           "this pool's demand can be met, other pools' cannot: "
                           f"{view.latest_binding}"[:1024]))
    elif latest is not None:
        conds.append(_cond(INFEASIBLE, False, "Feasible", "demand met with headroom"))
    else:
        conds.append(_cond(INFEASIBLE, False, "NotPlanned", "not part of the newest plan"))
    # Ready: the Deployments' ready replicas vs the plan in force
    want = served.replicas if served is not None else 0
    if want <= 0 and served is not None and served.shared_instances > 0:
        ok = shared_ready >= served.shared_instances
        conds.append(_cond(READY, ok, "ReplicasReady" if ok else "ReplicasNotReady",
                           f"no instances of its own; served on {served.shared_instances} "
                           f"shared instance(s) of {', '.join(served.hosts)}, "
                           f"{shared_ready} of them ready"))
    elif want <= 0:
        conds.append(_cond(READY, False, "NoReplicasPlanned", "no instances planned"))
    elif not deployable:
        conds.append(_cond(READY, False, "NoTemplate",
                           "spec.template has no containers: planned, nothing to deploy"))
    else:
        ok = ready_replicas >= want
        message = f"{ready_replicas}/{want} replicas ready"
        if served is not None and served.shared_instances > 0:  # and some of others'
            ok = ok and shared_ready >= served.shared_instances
            message += (f"; also served on {served.shared_instances} shared instance(s) of "
                        f"{', '.join(served.hosts)}, {shared_ready} of them ready")
        conds.append(_cond(READY, ok, "ReplicasReady" if ok else "ReplicasNotReady", message))
    return conds


def pool_status(
    entry: PoolEntry, view: PlanView, ready_replicas: int, deployable: bool,
    write_error: str | None = None, shared_ready: int = 0,
) -> dict[str, Any]:
    """The pool's status without times: conditions, assignments and figures
    (``shared_ready``: see :func:`pool_conditions`)."""
    key = entry.key
    in_plan = view.in_force is not None and key in view.in_force.pools
    served = view.in_force_outcomes.get(key) if in_plan else None
    status: dict[str, Any] = {
        "observedGeneration": entry.generation,
        "conditions": pool_conditions(entry, view, ready_replicas, deployable, write_error,
                                      shared_ready),
        "assignments": [a.model_dump(by_alias=True, mode="json")
                        for a in (served.assignments if served else ())],
        "replicas": served.replicas if served else 0,
        "expectedPowerWatts": _round(served.expected_power_w) if served else None,
        "joulesPerToken": _round(served.joules_per_token) if served else None,
        "gramsCO2PerHour": _round(served.grams_co2_per_hour) if served else None,
    }
    return status


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")


#: status fields other writers own (the node agents' observed prompt lengths): the
#: operator neither writes nor compares them
_NOT_OPERATOR_FIELDS = frozenset({
    InferencePoolStatus.model_fields["observed_input_tokens"].alias})


def _strip_times(status: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in status.items()
           if v is not None and k != "lastPlanTime" and k not in _NOT_OPERATOR_FIELDS}
    out["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"}
        for c in status.get("conditions") or [] if isinstance(c, Mapping)
    ]
    out.setdefault("assignments", [])
    return out


def same_status(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal apart from times (and None vs absent) in the fields the operator writes."""
    return _strip_times(a) == _strip_times(b)


def with_times(
    status: dict[str, Any], previous: Mapping[str, Any], now: datetime, force: bool = False,
) -> dict[str, Any]:
    """Add ``lastTransitionTime`` (kept while a condition's status holds) and ``lastPlanTime``
    (kept while nothing else changes, unless ``force``: a periodic re-plan stamps it)."""
    prev_conds = {c.get("type"): c for c in previous.get("conditions") or []
                  if isinstance(c, Mapping)}
    stamp = _iso(now)
    for c in status["conditions"]:
        old = prev_conds.get(c["type"])
        if old is not None and old.get("status") == c["status"] and old.get("lastTransitionTime"):
            c["lastTransitionTime"] = old["lastTransitionTime"]
        else:
            c["lastTransitionTime"] = stamp
    unchanged = same_status(status, previous) and previous.get("lastPlanTime")
    status["lastPlanTime"] = previous["lastPlanTime"] if unchanged and not force else stamp
    return status


def status_patch(status: Mapping[str, Any]) -> dict[str, Any]:
    """Merge patch for the status subresource: every field set; None (JSON null) unsets."""
    return {"status": dict(status)}


def fingerprint(parts: Sequence[Any]) -> str:
    """Stable digest of the planning inputs (skip a solve when nothing changed)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
