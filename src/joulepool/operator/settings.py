"""Command-line settings of ``joulepool operator`` (flags > env > ``--config`` YAML > defaults).

The layering is :mod:`joulepool.settings`; the variable names are those the Helm chart
sets. :func:`joulepool.operator.cli.config_from_args` turns them into the
:class:`joulepool.operator.config.OperatorConfig` the operator runs with.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import field_validator

from joulepool.api.contract import (
    DEFAULT_SCHEDULER,
    EPP_PORT,
    OPERATOR_LIVENESS_PORT,
    OPERATOR_METRICS_PORT,
)
from joulepool.settings import ComponentSettings, setting

#: the operator's default debounce (quiet time before a joint plan), seconds
DEBOUNCE_SECONDS = 1.0


class OperatorSettings(ComponentSettings):
    """Every command-line setting of the operator; see ``joulepool operator --help``."""

    CONFIG_ENV: ClassVar[str] = "JOULEPOOL_OPERATOR_CONFIG"

    namespace: str | None = setting(
        None, "namespace of the plan ConfigMap joulepool-plan (default: the service account's "
        "namespace, else joulepool-system)", env="POD_NAMESPACE")
    watch_namespace: list[str] = setting(
        [], "serve InferencePools only in this namespace (also comma-separated); default: all "
        "namespaces", env="WATCH_NAMESPACE")
    scheduler_name: str = setting(DEFAULT_SCHEDULER, "schedulerName of the serving pods",
                                  env="JOULEPOOL_SCHEDULER")
    debounce_seconds: float = setting(
        DEBOUNCE_SECONDS, "quiet time after the last change before the joint plan runs",
        env="JOULEPOOL_DEBOUNCE", ge=0)
    liveness: int = setting(OPERATOR_LIVENESS_PORT, "port of the liveness endpoint /healthz "
                            "(0: none)", env="JOULEPOOL_LIVENESS", ge=0, le=65535)
    metrics_port: int = setting(
        OPERATOR_METRICS_PORT, "port of the Prometheus endpoint /metrics (0: none)",
        env="JOULEPOOL_METRICS_PORT", ge=0, le=65535)
    metrics_address: str = setting(
        "127.0.0.1", "address the /metrics endpoint binds: the pod's IP in a pod (the chart "
        "passes status.podIP), loopback elsewhere", env="JOULEPOOL_METRICS_ADDRESS",
        min_length=1)
    liveness_address: str = setting(
        "127.0.0.1", "address the liveness endpoint binds: the pod's IP in a pod (the chart "
        "passes status.podIP), loopback elsewhere; never all interfaces unless asked",
        env="JOULEPOOL_LIVENESS_ADDRESS", min_length=1)
    epp_service: str = setting(
        "", "Service of joulepool's GIE endpoint picker, in the operator's namespace: with "
        "it, the operator creates a GIE InferencePool (inference.networking.k8s.io/v1) per "
        "pool when GIE's CRD is installed; empty: none", env="JOULEPOOL_EPP_SERVICE")
    epp_port: int = setting(EPP_PORT, "the picker Service's gRPC port",
                            env="JOULEPOOL_EPP_PORT", ge=1, le=65535)
    epp_failure_mode: str = setting(
        "FailClose", "endpointPickerRef.failureMode of the GIE pools: FailClose (the "
        "gateway refuses requests while the picker is unreachable) or FailOpen (it "
        "forwards them to any pod)", env="JOULEPOOL_EPP_FAILURE_MODE")
    verbose: bool = setting(False, "log every handler and request", env="JOULEPOOL_VERBOSE")

    @field_validator("epp_failure_mode")
    @classmethod
    def _failure_mode(cls, value: str) -> str:
        if value not in ("FailClose", "FailOpen"):
            raise ValueError(f"{value!r}: choose FailClose or FailOpen")
        return value

    @field_validator("watch_namespace", mode="after")
    @classmethod
    def _split_commas(cls, value: list[str]) -> list[str]:
        """``["a, b", "c"]`` -> ``["a", "b", "c"]``, first occurrence kept."""
        names = (ns.strip() for item in value for ns in item.split(","))
        return list(dict.fromkeys(ns for ns in names if ns))
