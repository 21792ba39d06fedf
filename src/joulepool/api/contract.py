"""joulepool's Kubernetes contract: every label, annotation, resource name and port, once.

Shells (operator, extender, router, node agent) and the fakes import these
names; none of them spells a label or a port itself. Engine metric names are
in :mod:`joulepool.api.vllm`; the plan ConfigMap's name and key in
:mod:`joulepool.api.plan`.
"""

from __future__ import annotations

# -- API group, version, resources and finalizer ------------------------------
GROUP = "joulepool.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
#: plural resource names of the three kinds (URLs, RBAC rules, CRD names)
INFERENCEPOOLS = "inferencepools"
GPUPROFILES = "gpuprofiles"
ENERGYPOLICIES = "energypolicies"
#: the one EnergyPolicy joulepool uses (cluster scoped)
POLICY_NAME = "default"
#: finalizer the operator puts on InferencePools it manages
FINALIZER = "joulepool.dev/finalizer"

#: namespace of joulepool's own components and plan ConfigMap when none is given
DEFAULT_NAMESPACE = "joulepool-system"
#: scheduler name of serving pods (the second profile of kube-scheduler with the extender)
DEFAULT_SCHEDULER = "joulepool-scheduler"
#: the file in every pod that holds its own namespace
SERVICE_ACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

# -- labels joulepool sets on what it creates --------------------------------
#: the pool a serving pod or Deployment belongs to; value ``<namespace>.<name>``
POOL_LABEL = "joulepool.dev/pool"
#: serving mode of a pool's pod (e.g. ``4xH100``)
MODE_LABEL = "joulepool.dev/mode"
#: the serving engine of a pod (``vllm`` or ``sglang``): which metric names its page
#: has (:data:`api.enginemetrics.ENGINE_SPECS`); detected from the page when absent
ENGINE_LABEL = "joulepool.dev/engine"
#: the operator's Deployment a serving pod belongs to: one Deployment per (pool, mode, node),
#: pinned to its node, so each node's share of the plan holds by construction
PLACEMENT_LABEL = "joulepool.dev/placement"
#: the plan version a Deployment was written for
PLAN_VERSION_LABEL = "joulepool.dev/plan-version"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
#: value of :data:`MANAGED_BY_LABEL` on what the operator owns
MANAGED_BY = "joulepool-operator"
NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"

#: on each router replica's Lease (coordination.k8s.io/v1): the label value the
#: replicas list each other by (with :data:`COMPONENT_LABEL`)
ROUTER_REPLICA_COMPONENT = "router-replica"

# -- annotations ---------------------------------------------------------------
#: on each router replica's Lease: its cumulative per-pool, per-tier completion and
#: miss counts and its lambdas (JSON; kube.leases), read by the other replicas
ROUTER_COUNTS_ANNOTATION = "joulepool.dev/router-counts"
SPEC_HASH_ANNOTATION = "joulepool.dev/spec-hash"
#: on an InferencePool kopf left half-done (finalizer not added, or not removed after
#: deletion: kopf's own PATCH failed and nothing else would retry it): the operator
#: touched it so kopf runs its handlers again
RELEASE_RETRY_ANNOTATION = "joulepool.dev/release-retry"
PLAN_VERSION_ANNOTATION = "joulepool.dev/plan-version"
#: on the plan ConfigMap: when the plan in force was made (ISO 8601)
PLAN_GENERATED_AT_ANNOTATION = "joulepool.dev/generated-at"
#: on the plan ConfigMap: whether the plan in force met all demand ("true"/"false")
PLAN_FEASIBLE_ANNOTATION = "joulepool.dev/plan-feasible"
#: on the plan ConfigMap: whether the latest planning attempt met all demand
LATEST_PLAN_FEASIBLE_ANNOTATION = "joulepool.dev/latest-plan-feasible"
#: on the plan ConfigMap: what the latest planning attempt said (<= 1024 chars)
LATEST_PLAN_MESSAGE_ANNOTATION = "joulepool.dev/latest-plan-message"
#: optional pod annotation: the serving port the router sends requests to
PORT_ANNOTATION = "joulepool.dev/port"
#: optional pod annotation: the engine's metrics port (default: the serving port)
METRICS_PORT_ANNOTATION = "joulepool.dev/metrics-port"
#: optional pod annotation: the engine's metrics path (default ``/metrics``)
METRICS_PATH_ANNOTATION = "joulepool.dev/metrics-path"
#: optional pod annotation ``"0,1"``: which of the node's GPUs the engine uses
GPUS_ANNOTATION = "joulepool.dev/gpus"

# -- well-known Kubernetes and NVIDIA names ------------------------------------
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
#: site of a node without a region label
DEFAULT_SITE = "default"

# -- ports -------------------------------------------------------------------------
#: the scheduler extender
EXTENDER_PORT = 8888
#: the request routing service (``joulepool router``)
ROUTER_PORT = 8888
#: URL prefix of the scheduler extender verbs
EXTENDER_PREFIX = "/scheduler"
#: an engine's serving (and default metrics) port when a pod names none (vLLM's default)
ENGINE_PORT = 8000
#: the node agent's /metrics and /healthz
NODE_AGENT_METRICS_PORT = 9400
#: the node agent pods' ``app.kubernetes.io/component`` label (the chart's): the router
#: reads their GPU energy per serving pod on NODE_AGENT_METRICS_PORT
NODE_AGENT_COMPONENT = "node-agent"
#: the operator's liveness endpoint /healthz
OPERATOR_LIVENESS_PORT = 8080
#: the operator's Prometheus endpoint /metrics (plan, pools, carbon sources)
OPERATOR_METRICS_PORT = 9402
#: the fake device plugin's and NVIDIA's kubelet device plugin directory
DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
#: the kubelet PodResources API socket the node agent maps engines to GPUs with
POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"

# -- serving engine arguments -----------------------------------------------------
#: the engine flag naming the models it answers to (vLLM: one or more names after it,
#: SGLang: one); the operator appends a pool's servedModelNames with it
SERVED_MODEL_NAME_FLAG = "--served-model-name"
#: engines whose flag takes a single name
SINGLE_SERVED_NAME_ENGINES = frozenset({"sglang"})

# -- request headers the routing proxy reads (OpenAI-compatible /v1/completions etc.) --
#: names the pool outright (otherwise the body's ``model`` chooses it)
POOL_HEADER = "x-joulepool-pool"
#: ``interactive`` or ``bulk``
TIER_HEADER = "x-joulepool-tier"
#: end-to-end deadline of the request, milliseconds
DEADLINE_HEADER = "x-joulepool-deadline-ms"
#: llm-d's per-request SLO headers (milliseconds), accepted as well
LLMD_TTFT_HEADER = "x-llm-d-slo-ttft-ms"
LLMD_TPOT_HEADER = "x-llm-d-slo-tpot-ms"
#: the answer names the engine that served (``ip:port``) and the request's router id
SERVED_BY_HEADER = "x-joulepool-endpoint"

# -- Gateway API Inference Extension (GIE) --------------------------------------------
#: the endpoint picker's gRPC (Envoy ext_proc) port: GIE's conventional 9002
EPP_PORT = 9002
#: GIE's pool kind, served by gateways: group, version, plural
GIE_GROUP = "inference.networking.k8s.io"
GIE_VERSION = "v1"
GIE_API_VERSION = f"{GIE_GROUP}/{GIE_VERSION}"
GIE_POOL_KIND = "InferencePool"
GIE_POOL_PLURAL = "inferencepools"
#: endpoint picker protocol (GIE proposal 004): headers and metadata keys
EPP_DESTINATION_HEADER = "x-gateway-destination-endpoint"
EPP_SUBSET_KEY = "x-gateway-destination-endpoint-subset"
EPP_SERVED_KEY = "x-gateway-destination-endpoint-served"
EPP_LB_NAMESPACE = "envoy.lb"
EPP_SUBSET_NAMESPACE = "envoy.lb.subset_hint"
