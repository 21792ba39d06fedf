"""Settings both cluster services take (scheduler extender, routing service).

Each service's settings model subclasses :class:`ServiceSettings` with its own
environment prefix, port and extra fields; the layering (flags > environment >
``--config`` YAML > defaults) is :mod:`joulepool.settings`'s. The routing
tunables' defaults are written once, in :class:`core.router.RouterConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from joulepool.api.contract import (
    DEFAULT_NAMESPACE,
    ENGINE_PORT,
    SERVICE_ACCOUNT_NAMESPACE_FILE,
)
from joulepool.api.plan import PLAN_CONFIGMAP
from joulepool.kube.pools import RouterSettings
from joulepool.settings import ComponentSettings, SettingsError

SA_NAMESPACE_FILE = Path(SERVICE_ACCOUNT_NAMESPACE_FILE)
MiB = 1 << 20
#: the router's defaults, written once in :class:`RouterSettings`
_R = RouterSettings()


class ServiceSettings(ComponentSettings):
    """Serving, cluster sources, engine scraping and routing tunables."""

    # -- serving --------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="address to listen on")
    tls_cert: Path | None = Field(None, description="TLS certificate (PEM); with --tls-key")
    tls_key: Path | None = Field(None, description="TLS private key (PEM); with --tls-cert")
    tls_client_ca: Path | None = Field(
        None, description="require client certificates signed by this CA (mTLS)"
    )
    token_file: Path | None = Field(
        None, description="bearer token file; requests without it get 401 "
        "(/healthz and /readyz stay open)",
    )
    max_body_bytes: int = Field(32 * MiB, ge=1024, description="largest request body (413 above)")
    read_timeout_seconds: float = Field(
        30.0, gt=0, description="longest wait for a request body (408 after)"
    )
    drain_seconds: float = Field(
        0.0, ge=0, le=300, description="on SIGTERM, answer /readyz 503 but keep serving "
        "this long (so Services and gateways stop sending), then stop accepting and let "
        "requests in flight finish (s)"
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="event loop of the service: uvloop (libuv; less CPU per "
        "request and gRPC message), asyncio (the standard library's), or auto (uvloop "
        "when installed)"
    )
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="longest wait for a complete request head, and longest "
        "idle keep-alive (the connection is closed after)"
    )

    # -- sources ------------------------------------------------------------------------------
    cluster: bool = Field(
        True, description="watch Nodes, Pods and the plan ConfigMap (--no-cluster: files only)"
    )
    kubeconfig: Path | None = Field(None, description="kubeconfig (default: in-cluster, then "
                                    "$KUBECONFIG / ~/.kube/config)")
    namespace: str | None = Field(
        None, description="namespace of the plan ConfigMap (default: own namespace or "
        f"{DEFAULT_NAMESPACE})",
    )
    plan_configmap: str = Field(PLAN_CONFIGMAP, description="name of the plan ConfigMap")
    plan_file: Path | None = Field(None, description="read the plan from this file instead")
    nodes_file: Path | None = Field(
        None, description="read Nodes and Pods from this List file instead of watching"
    )
    endpoints_file: Path | None = Field(None, description="static router pools and endpoints")
    file_poll_seconds: float = Field(
        2.0, ge=0, description="re-read changed files this often (0: read once)"
    )
    policy_poll_seconds: float = Field(
        30.0, ge=0, description="read EnergyPolicy/default (its pi gains and bulkLambdaFactor "
        "override the --pi-*/--lambda-*/--target-miss-rate/--bulk-lambda-factor settings while "
        "it exists) this often (0: never)",
    )
    watch_timeout_seconds: int = Field(
        300, ge=10, le=3600, description="server-side timeout of each watch request"
    )

    # -- engines and routing (the extender uses the queue estimate's) ----------------------
    scrape_interval_seconds: float = Field(
        2.0, ge=0, description="scrape endpoints' vLLM metrics this often (0: never)"
    )
    scrape_timeout_seconds: float = Field(1.0, gt=0, description="timeout of one scrape")
    scrape_concurrency: int = Field(64, ge=1, le=4096, description="scrapes in flight at once")
    metrics_path: str = Field(_R.metrics_path, description="path of the engines' metrics")
    metrics_port: int = Field(_R.metrics_port, ge=0, le=65535, description="engines' metrics port "
                              "(0: the serving port)")
    endpoint_port: int = Field(
        ENGINE_PORT, ge=1, le=65535, description="serving port when a pod names none"
    )
    fallbacks: int = Field(_R.fallbacks, ge=0, le=100, description="fallback endpoints per answer")
    pi_kp: float = Field(_R.kp, ge=0, description="PI proportional gain")
    pi_ki: float = Field(_R.ki, ge=0, description="PI integral gain")
    target_miss_rate: float = Field(
        _R.target_miss_rate, ge=0, le=1, description="deadline-miss target rho*"
    )
    lambda_min: float = Field(_R.lambda_min, ge=0, description="lower clamp of lambda")
    lambda_max: float = Field(_R.lambda_max, gt=0, description="upper clamp of lambda")
    lambda_initial: float = Field(_R.lambda_initial, ge=0, description="lambda before any feedback")
    pi_every: int = Field(_R.pi_every, ge=1, description="PI step after this many completions")
    pi_period_seconds: float = Field(_R.pi_period_s, gt=0, description="or after this long")
    miss_window_seconds: float = Field(
        _R.miss_window_s, gt=0, description="sliding miss-ratio window"
    )
    bulk_lambda_factor: float = Field(
        _R.bulk_lambda_factor, ge=0, le=1, description="bulk tier's lambda multiplier"
    )
    hard_deadline: bool = Field(
        _R.hard_deadline, description="interactive requests go to endpoints predicted to meet the "
        "deadline before any that would miss it (default: the paper's soft cost)",
    )
    input_token_weight: float = Field(
        _R.input_token_weight, ge=0,
        description="prompt tokens counted into t_r (0: t_r = output tokens)"
    )
    mean_output_tokens: float = Field(
        _R.mean_output_tokens, gt=0, description="assumed mean output tokens before any traffic"
    )
    eps_half_life_seconds: float = Field(
        _R.eps_half_life_s, gt=0,
        description="half-life of the online eps correction (measured joules)"
    )
    eps_min_tokens: float = Field(
        _R.eps_min_tokens, gt=0,
        description="reported tokens before measured joules correct the profile"
    )
    inflight_ttl_seconds: float = Field(
        _R.inflight_ttl_s, gt=0,
        description="forget routed requests never reported complete after this"
    )
    default_joules_per_token: float = Field(
        _R.default_eps, gt=0, description="eps of endpoints without a profile (assumed)"
    )
    default_tokens_per_second: float = Field(
        _R.default_tps, gt=0, description="throughput of endpoints without a profile (assumed)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServiceSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if not self.metrics_path.startswith("/"):
            raise ValueError("metrics-path must start with '/'")
        if self.lambda_min > self.lambda_max:
            raise ValueError("lambda-min must be <= lambda-max")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "token_file", "kubeconfig",
                     "plan_file", "nodes_file", "endpoints_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name.replace('_', '-')}: no such file: {path}")
        return self

    def check_sources(self) -> None:
        """The CLI's extra check: without the cluster, something must feed the service."""
        if not self.cluster and self.nodes_file is None and self.plan_file is None \
                and self.endpoints_file is None:
            raise SettingsError("--no-cluster needs at least one of --plan-file, --nodes-file, "
                                "--endpoints-file")

    def plan_namespace(self) -> str:
        if self.namespace:
            return self.namespace
        try:
            return SA_NAMESPACE_FILE.read_text().strip() or DEFAULT_NAMESPACE
        except OSError:
            return DEFAULT_NAMESPACE


    def router_settings(self) -> RouterSettings:
        """The routing tunables as core's router config (plus the scrape path and port)."""
        return RouterSettings(
            fallbacks=self.fallbacks, kp=self.pi_kp, ki=self.pi_ki,
            target_miss_rate=self.target_miss_rate, lambda_min=self.lambda_min,
            lambda_max=self.lambda_max, lambda_initial=self.lambda_initial,
            pi_every=self.pi_every, pi_period_s=self.pi_period_seconds,
            miss_window_s=self.miss_window_seconds, bulk_lambda_factor=self.bulk_lambda_factor,
            hard_deadline=self.hard_deadline, input_token_weight=self.input_token_weight,
            mean_output_tokens=self.mean_output_tokens,
            eps_half_life_s=self.eps_half_life_seconds, eps_min_tokens=self.eps_min_tokens,
            inflight_ttl_s=self.inflight_ttl_seconds, default_eps=self.default_joules_per_token,
            default_tps=self.default_tokens_per_second, metrics_path=self.metrics_path,
            metrics_port=self.metrics_port,
        )
