"""Settings of ``joulepool operator`` (one dataclass; the CLI and tests fill it)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from joulepool.api.contract import (
    DEFAULT_NAMESPACE,
    DEFAULT_SCHEDULER,
    GROUP,
    SERVICE_ACCOUNT_NAMESPACE_FILE,
)
from joulepool.operator.settings import DEBOUNCE_SECONDS

ANNOTATION_PREFIX = GROUP
#: the operator's field manager (server-side apply; ``metadata.managedFields``)
FIELD_MANAGER = "joulepool-operator"


#: endpointPickerRef.failureMode values of GIE's InferencePool v1
FAILURE_MODES = ("FailClose", "FailOpen")


@dataclass(frozen=True)
class PickerRef:
    """Where joulepool's endpoint picker listens: Service name and namespace, gRPC port."""

    service: str
    namespace: str
    port: int
    failure_mode: str = "FailClose"

    def __post_init__(self) -> None:
        if self.failure_mode not in FAILURE_MODES:
            raise ValueError(f"failure mode {self.failure_mode!r}: choose "
                             f"{' or '.join(FAILURE_MODES)}")


def default_namespace() -> str:
    """The operator's namespace: ``POD_NAMESPACE``, else the service account's, else a default."""
    env = os.environ.get("POD_NAMESPACE")
    if env:
        return env
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE_FILE, encoding="utf-8") as f:
            return f.read().strip() or DEFAULT_NAMESPACE
    except OSError:
        return DEFAULT_NAMESPACE


@dataclass
class OperatorConfig:
    #: where the plan ConfigMap ``joulepool-plan`` lives
    namespace: str = field(default_factory=default_namespace)
    #: namespaces whose InferencePools and Deployments are served; empty = all (cluster-wide)
    watch_namespaces: tuple[str, ...] = ()
    scheduler_name: str = DEFAULT_SCHEDULER
    #: quiet time after the last change before the joint plan runs
    debounce_seconds: float = DEBOUNCE_SECONDS
    #: a steady stream of changes cannot postpone a plan longer than this
    max_delay_seconds: float = 10.0
    #: periodic re-plan when no EnergyPolicy says otherwise (EnergyPolicy.planIntervalSeconds)
    plan_interval_seconds: float | None = None
    #: port of kopf's liveness endpoint (``/healthz``); None: no endpoint
    liveness_port: int | None = None
    #: port of the Prometheus endpoint ``/metrics`` (planner and carbon sources); None: none
    metrics_port: int | None = None
    #: address the ``/metrics`` endpoint binds
    metrics_address: str = "127.0.0.1"
    #: address the liveness endpoint binds (an IPv4/IPv6 address or host name)
    liveness_address: str = "127.0.0.1"
    #: concurrent API writes of one reconcile pass
    write_concurrency: int = 16
    #: delays between retries of one failed API call (5xx, 409, 429, timeouts)
    retry_delays: tuple[float, ...] = (0.1, 0.3, 1.0, 2.0, 5.0)
    #: per-request timeout of the operator's own API calls, seconds
    request_timeout: float = 30.0
    #: after a reconcile pass that could not write everything, try again after this
    resync_after_error_seconds: float = 5.0
    #: every listing is checked this often for objects deleted while a watch was down
    #: (kopf's re-listing after 410 Gone keeps them in its indexes), seconds
    listing_check_seconds: float = 300.0
    #: a pool kopf left half-done this long (finalizer not added, or not removed after
    #: deletion) is touched so kopf runs its handlers again
    release_retry_seconds: float = 30.0
    #: ... doubled after each failed pass in a row, up to this
    max_resync_after_error_seconds: float = 300.0
    #: joulepool's endpoint picker Service: with it, a GIE InferencePool per pool when
    #: GIE's CRD is served (operator.gateway); None: none
    picker: PickerRef | None = None
    #: a ``kopf.ConnectionInfo`` to use instead of in-cluster / kubeconfig login (tests)
    connection: Any = None
    #: kopf watch-stream timeouts, seconds. The server-side one travels as the watch's
    #: ``timeoutSeconds`` query parameter, which kube-apiserver parses as an integer
    #: (``300.0`` is answered 400): a whole number of seconds, at least 1.
    watch_server_timeout: int | None = 300
    watch_client_timeout: float | None = 330.0

    def __post_init__(self) -> None:
        timeout = self.watch_server_timeout
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                    or timeout < 1):
            raise ValueError(
                f"watch_server_timeout must be a whole number of seconds >= 1 (it is sent "
                f"as the watch's timeoutSeconds), got {timeout!r}")
