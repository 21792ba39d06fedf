"""Settings of ``joulepool extender``: flags > environment > ``--config`` YAML > defaults.

Every setting ``foo_bar`` is
  * the flag ``--foo-bar`` (booleans also ``--no-foo-bar``),
  * the environment variable ``JOULEPOOL_EXTENDER_FOO_BAR``,
  * the key ``foo-bar`` (or ``foo_bar``) of the ``--config`` YAML mapping.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from joulepool.api.contract import EXTENDER_PORT as DEFAULT_PORT
from joulepool.api.contract import EXTENDER_PREFIX as DEFAULT_PREFIX
from joulepool.api.plan import PLAN_CONFIGMAP
from joulepool.core.controllers import PIController
from joulepool.core.cost import BULK_LAMBDA_FACTOR

ENV_PREFIX = "JOULEPOOL_EXTENDER_"
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_NAMESPACE = "joulepool-system"
MiB = 1 << 20


class SettingsError(ValueError):
    """Bad flag, environment variable or config file value."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    # -- serving --------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="port to listen on (0: any)")
    prefix: str = Field(DEFAULT_PREFIX, description="URL prefix of the scheduler verbs")
    tls_cert: Path | None = Field(None, description="TLS certificate (PEM); with --tls-key")
    tls_key: Path | None = Field(None, description="TLS private key (PEM); with --tls-cert")
    tls_client_ca: Path | None = Field(
        None, description="require client certificates signed by this CA (mTLS)"
    )
    token_file: Path | None = Field(
        None, description="bearer token file; requests without it get 401 "
        "(/healthz and /readyz stay open)",
    )
    token_scope: Literal["all", "router"] = Field(
        "all", description="paths the token guards: all, or router (/v1/*, /metrics, /debug) "
        "-- kube-scheduler cannot send tokens, so use 'router' (and TLS) with it",
    )
    max_body_bytes: int = Field(32 * MiB, ge=1024, description="largest request body (413 above)")
    max_nodes: int = Field(20000, ge=1, description="most candidate nodes per call (413 above)")
    read_timeout_seconds: float = Field(
        30.0, gt=0, description="longest wait for a request body (408 after)"
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
    watch_timeout_seconds: int = Field(
        300, ge=10, le=3600, description="server-side timeout of each watch request"
    )

    # -- router ---------------------------------------------------------------------------------
    scrape_interval_seconds: float = Field(
        2.0, ge=0, description="scrape endpoints' vLLM metrics this often (0: never)"
    )
    scrape_timeout_seconds: float = Field(1.0, gt=0, description="timeout of one scrape")
    scrape_concurrency: int = Field(64, ge=1, le=4096, description="scrapes in flight at once")
    metrics_path: str = Field("/metrics", description="path of the engines' metrics")
    metrics_port: int = Field(0, ge=0, le=65535, description="engines' metrics port "
                              "(0: the serving port)")
    endpoint_port: int = Field(
        8000, ge=1, le=65535, description="serving port when a pod names none"
    )
    fallbacks: int = Field(3, ge=0, le=100, description="fallback endpoints per answer")
    pi_kp: float = Field(PIController.kp, ge=0, description="PI proportional gain")
    pi_ki: float = Field(PIController.ki, ge=0, description="PI integral gain")
    target_miss_rate: float = Field(
        PIController.target, ge=0, le=1, description="deadline-miss target rho*"
    )
    lambda_min: float = Field(PIController.lam_min, ge=0, description="lower clamp of lambda")
    lambda_max: float = Field(PIController.lam_max, gt=0, description="upper clamp of lambda")
    lambda_initial: float = Field(PIController.lam, ge=0, description="lambda before any feedback")
    pi_every: int = Field(50, ge=1, description="PI step after this many completions")
    pi_period_seconds: float = Field(10.0, gt=0, description="or after this long")
    miss_window_seconds: float = Field(60.0, gt=0, description="sliding miss-ratio window")
    bulk_lambda_factor: float = Field(
        BULK_LAMBDA_FACTOR, ge=0, le=1, description="bulk tier's lambda multiplier"
    )
    hard_deadline: bool = Field(
        False, description="interactive requests go to endpoints predicted to meet the "
        "deadline before any that would miss it (default: the paper's soft cost)",
    )
    input_token_weight: float = Field(
        0.0, ge=0, description="prompt tokens counted into t_r (0: t_r = output tokens)"
    )
    mean_output_tokens: float = Field(
        256.0, gt=0, description="assumed mean output tokens before any traffic"
    )
    eps_half_life_seconds: float = Field(
        120.0, gt=0, description="half-life of the online eps correction (measured joules)"
    )
    eps_min_tokens: float = Field(
        1000.0, gt=0, description="reported tokens before measured joules correct the profile"
    )
    inflight_ttl_seconds: float = Field(
        300.0, gt=0, description="forget routed requests never reported complete after this"
    )
    default_joules_per_token: float = Field(
        1.0, gt=0, description="eps of endpoints without a profile (assumed)"
    )
    default_tokens_per_second: float = Field(
        1000.0, gt=0, description="throughput of endpoints without a profile (assumed)"
    )

    # -- placement ----------------------------------------------------------------------------
    placement_lambda: float = Field(
        1e4, ge=0, description="placement cost of utilisation above the ceiling (W per unit)"
    )
    max_utilisation: float = Field(0.9, gt=0, le=1, description="node utilisation ceiling")
    replica_utilisation: float = Field(
        0.9, gt=0, le=1, description="load a replica carries, as a share of its capacity"
    )
    queue_horizon_seconds: float = Field(
        10.0, gt=0, description="queued tokens on a node count as load draining in this time"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.prefix and (not self.prefix.startswith("/") or self.prefix.endswith("/")):
            raise ValueError("prefix must start with '/' and not end with '/'")
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


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; defaults stay None so other layers can fill them."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings (flag names)")
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = f" (default: {default})" if default is not None else ""
        help_text = (field.description or "") + shown
        if _is_bool(field.annotation):
            parser.add_argument(
                _flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                help=help_text,
            )
        else:
            metavar = _metavar(field.annotation)
            parser.add_argument(
                _flag(name), dest=name, default=None, metavar=metavar, help=help_text
            )


def _metavar(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(annotation)) + "}"
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if args else str
    return {int: "N", float: "X", Path: "PATH"}.get(annotation, "TEXT")


def _config_layer(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(f"--config {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"--config {path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"--config {path}: expected a mapping of setting: value")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in Settings.model_fields:
            raise SettingsError(
                f"--config {path}: unknown setting {key!r} "
                f"(known: {', '.join(sorted(n.replace('_', '-') for n in Settings.model_fields))})"
            )
        out[name] = value
    return out


def _env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name == "config":
            continue
        if name not in Settings.model_fields:
            raise SettingsError(f"unknown environment variable {key}")
        out[name] = value
    return out


def load_settings(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge the layers and validate; errors name the setting."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    config = getattr(args, "config", None) or env.get(ENV_PREFIX + "CONFIG")
    if config:
        for k, v in _config_layer(config).items():
            values[k], sources[k] = v, f"--config {config}"
    for k, v in _env_layer(env).items():
        values[k], sources[k] = v, ENV_PREFIX + k.upper()
    if args is not None:
        for k in Settings.model_fields:
            v = getattr(args, k, None)
            if v is not None:
                values[k], sources[k] = v, _flag(k)
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = str(err["loc"][0]) if err["loc"] else ""
        where = sources.get(loc, _flag(loc) if loc else "settings")
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise SettingsError(f"{where}: {msg}") from None
