"""Builders of realistic Kubernetes objects and extender requests, for tests and benchmarks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from joulepool.api.contract import (
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    MODE_LABEL,
    POOL_LABEL,
    REGION_LABEL,
)
from joulepool.api.models import GROUP, VERSION
from joulepool.api.plan import (
    PlanDocument,
    PlannedInstance,
    PlannedNode,
    PlannedPool,
    PlannedSLO,
)

if TYPE_CHECKING:
    from joulepool.core.profiles import ServingProfile

PRODUCT_LABELS = {
    "H100": "NVIDIA-H100-80GB-HBM3",
    "A100": "NVIDIA-A100-SXM4-80GB",
    "L4": "NVIDIA-L4",
}


def node(name: str, product: str = "H100", gpus: int = 8, region: str = "eu-west",
         extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A Node as the API server returns it (trimmed of managedFields)."""
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": f"gpu-{product.lower()}-{gpus}x",
        REGION_LABEL: region,
        "topology.kubernetes.io/zone": f"{region}-a",
        GPU_PRODUCT_LABEL: PRODUCT_LABELS.get(product, product),
        "nvidia.com/gpu.count": str(gpus),
        **(extra_labels or {}),
    }
    resources = {
        "cpu": "96", "memory": "1056451584Ki", "ephemeral-storage": "3750000000Ki",
        "hugepages-1Gi": "0", "pods": "110", GPU_RESOURCE: str(gpus),
    }
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "resourceVersion": "4711",
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": labels,
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"podCIDR": "10.244.1.0/24", "providerID": f"kind://docker/kind/{name}"},
        "status": {
            "capacity": dict(resources),
            "allocatable": dict(resources),
            "conditions": [
                {"type": "MemoryPressure", "status": "False",
                 "reason": "KubeletHasSufficientMemory"},
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "lastHeartbeatTime": "2025-01-01T00:00:00Z"},
            ],
            "addresses": [{"type": "InternalIP", "address": "172.18.0.2"},
                          {"type": "Hostname", "address": name}],
            "nodeInfo": {"kubeletVersion": "v1.31.0", "containerRuntimeVersion": "containerd://1.7"},
        },
    }


def pod(name: str, namespace: str = "default", pool: str | None = "default.chat",
        gpus: int = 1, node_name: str = "", ready: bool = False, ip: str = "",
        port: int = 8000, phase: str | None = None, init_gpus: int = 0,
        mode: str | None = None) -> dict[str, Any]:
    """A serving Pod as kube-scheduler sends it (pending) or as the watch sees it.

    ``mode`` adds the operator's ``joulepool.dev/mode`` label (e.g. ``4xH100``)."""
    labels = {"app.kubernetes.io/name": "vllm", "pod-template-hash": "5d8c7b9f4"}
    if pool:
        labels[POOL_LABEL] = pool
    if mode:
        labels[MODE_LABEL] = mode
    containers = [
        {
            "name": "vllm",
            "image": "vllm/vllm-openai:v0.6.3",
            "args": ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--port", str(port)],
            "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
            "resources": {
                "requests": {"cpu": "8", "memory": "64Gi", GPU_RESOURCE: str(gpus)},
                "limits": {"memory": "64Gi", GPU_RESOURCE: str(gpus)},
            } if gpus else {"requests": {"cpu": "1"}},
            "readinessProbe": {"httpGet": {"path": "/health", "port": port}},
        },
        {
            "name": "node-agent",
            "image": "ghcr.io/joulepool/joulepool:0.1.0",
            "args": ["sidecar"],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        },
    ]
    spec: dict[str, Any] = {
        "schedulerName": "joulepool-scheduler",
        "containers": containers,
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
    }
    if init_gpus:
        spec["initContainers"] = [{
            "name": "warmup", "image": "busybox",
            "resources": {"limits": {GPU_RESOURCE: str(init_gpus)}},
        }]
    if node_name:
        spec["nodeName"] = node_name
    status: dict[str, Any] = {"phase": phase or ("Running" if node_name else "Pending"),
                              "qosClass": "Burstable"}
    if ready:
        status["podIP"] = ip
        status["conditions"] = [
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": "True"},
            {"type": "ContainersReady", "status": "True"},
            {"type": "PodScheduled", "status": "True"},
        ]
    else:
        status["conditions"] = [{"type": "PodScheduled", "status": "False",
                                 "reason": "Unschedulable"}]
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{namespace}-{name}",
            "resourceVersion": "815",
            "labels": labels,
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": f"{name}-rs", "uid": "rs-uid", "controller": True}],
        },
        "spec": spec,
        "status": status,
    }


Assignment = tuple[str, str, int] | tuple[str, str, int, int]


def plan(pools: dict[str, list[Assignment]], model: str = "llama-3.1-8b",
         tpot_s: float = 0.05, ttft_s: float = 0.5, version: int = 7,
         tier: str = "interactive", node_gpus: dict[str, int] | None = None) -> PlanDocument:
    """A plan: pool key -> [(node, product, gpus)], 1-GPU instances of mode ``1x<product>``;
    or [(node, product, instances, gpus per instance)], mode ``<gpus per instance>x<product>``."""
    planned: dict[str, PlannedPool] = {}
    nodes: dict[str, PlannedNode] = {}
    for key, assignments in pools.items():
        ns, _, name = key.partition(".")
        items = []
        for entry in assignments:
            node_name, product, instances = entry[0], entry[1], entry[2]
            per = entry[3] if len(entry) == 4 else 1
            gpus = instances * per
            items.append(PlannedInstance(
                node=node_name, site="eu-west", product=product, mode=f"{per}x{product}",
                instances=instances, gpus=gpus, gpusPerInstance=per,
            ))
            pn = nodes.setdefault(node_name, PlannedNode(
                site="eu-west", product=product, gpus=(node_gpus or {}).get(node_name, 8)
            ))
            pn.pools[key] = pn.pools.get(key, 0) + gpus
        planned[key] = PlannedPool(
            namespace=ns, name=name, model=model, tier=tier,
            slo=PlannedSLO(ttftSeconds=ttft_s, tpotSeconds=tpot_s),
            replicas=sum(a.instances for a in items), assignments=items,
        )
    return PlanDocument(version=version, pools=planned, nodes=nodes)


def extender_args(pod_obj: dict[str, Any], nodes: list[dict[str, Any]] | None = None,
                  names: list[str] | None = None) -> dict[str, Any]:
    """ExtenderArgs as kube-scheduler marshals it: nil pointers are null."""
    return {
        "Pod": pod_obj,
        "Nodes": {"metadata": {}, "items": nodes} if nodes is not None else None,
        "NodeNames": names,
    }


def gpu_profile(name: str, profile: ServingProfile) -> dict[str, Any]:
    """A GPUProfile resource carrying ``profile``'s figures (one GPU per instance), as a
    user writes it: metadata.name and spec, no status."""
    p = profile
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "GPUProfile", "metadata": {"name": name},
        "spec": {"product": p.product.name, "model": p.model, "gpus": 1,
                 "idleWatts": p.product.idle_w.value, "maxBatch": int(p.max_batch.value),
                 "prefillTokensPerSecond": p.prefill_tokens_per_s.value,
                 "clock": {"minMHz": p.f_min, "maxMHz": p.f_max},
                 "batchPoints": [{"batch": b.batch,
                                  "interTokenLatencySeconds": b.itl_ms.value / 1e3,
                                  "powerWatts": b.power_w.value} for b in p.points]},
    }
