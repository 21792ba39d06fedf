"""Settings of ``joulepool router``: flags > environment > ``--config`` YAML > defaults.

The layering is :mod:`joulepool.settings`; the fields both cluster services take
are :class:`joulepool.kube.settings.ServiceSettings`'s. Every setting ``foo_bar``
is the flag ``--foo-bar``, the environment variable ``JOULEPOOL_ROUTER_FOO_BAR``
and the key ``foo-bar`` of the ``--config`` YAML mapping.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from joulepool import settings as settings_base
from joulepool.api.contract import EPP_PORT, NODE_AGENT_METRICS_PORT, ROUTER_PORT
from joulepool.core.scoring import PROFILES, routing_profile
from joulepool.kube.pools import RouterSettings
from joulepool.kube.settings import ServiceSettings
from joulepool.settings import SettingsError

__all__ = ["Settings", "SettingsError", "add_arguments", "load_settings"]


class Settings(ServiceSettings):
    """Settings of the request routing service."""

    ENV_PREFIX: ClassVar[str] = "JOULEPOOL_ROUTER_"
    STRICT_ENV: ClassVar[bool] = True
    CONFIG_ENV: ClassVar[str] = "JOULEPOOL_ROUTER_CONFIG"

    port: int = Field(ROUTER_PORT, ge=0, le=65535, description="port to listen on (0: any)")
    epp_port: int = Field(
        -1, ge=-1, le=65535,
        description=f"gRPC port of the GIE endpoint picker (Envoy ext_proc; GIE's usual "
        f"{EPP_PORT}; 0: any; -1: off)",
    )
    picker_front_end: Literal["auto", "native", "python"] = Field(
        "auto", description="the GIE endpoint picker's gRPC front end: native (C++ "
        "grpc++ holds the ext_proc streams and calls the router once per request and "
        "response; built by `make native`), python (grpcio's asyncio server), or auto "
        "(native when built)")

    @field_validator("picker_front_end")
    @classmethod
    def _front_end_built(cls, value: str) -> str:
        if value == "native":
            from joulepool.router.epp_native import UNAVAILABLE
            if UNAVAILABLE is not None:
                raise ValueError(UNAVAILABLE)
        return value

    routing: str = Field(
        RouterSettings.routing, description="routing profile of every pool: "
        + ", ".join(sorted(PROFILES)),
    )

    engine_connect_timeout_seconds: float = Field(
        2.0, gt=0, le=60, description="proxy: time to connect to an engine before the "
        "request is retried on the next endpoint (s)")
    engine_connections: int = Field(
        1000, ge=1, le=100_000, description="proxy: most open connections to the engines")

    proxy_max_waiting: int = Field(
        1000, ge=0, le=1_000_000, description="proxy: most requests held per pool while "
        "every endpoint is saturated (more are answered 429)")
    proxy_max_wait_seconds: float = Field(
        30.0, gt=0, le=3600, description="proxy: longest a request is held before a 429 (s)")

    replica_name: str | None = Field(
        None, min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="this replica's name, and its Lease's (default: the host name; the "
        "chart passes the pod name)")
    replica_uid: str | None = Field(
        None, description="UID of this replica's Pod: its Lease is owned by the Pod and "
        "deleted with it (the chart passes it)")
    replica_sync_seconds: float = Field(
        2.0, ge=0, le=300, description="with --cluster: publish this replica's completion "
        "and miss counts in its Lease and read the other replicas' this often, so every "
        "replica's PI lambda follows the pool-wide miss rate (0: off, local counts only)")
    replica_ttl_seconds: float = Field(
        10.0, gt=0, le=3600, description="a replica whose Lease was not renewed for this "
        "long is left out of the pool-wide counts (s)")

    clocks_follow_load: bool = Field(
        True, description="the node agents steer the serving GPUs' clocks (MIAD): each "
        "batch's decode energy is read at the clock it needs (--no-clocks-follow-load where "
        "no node agent steers them: at the highest clock; the chart sets it when "
        "nodeAgent.enabled is false)")
    energy_metrics_urls: list[str] = Field(
        default_factory=list, description="pages publishing the GPU energy of serving pods "
        "(joulepool_gpu_energy_joules or DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION with pod and "
        "namespace labels), read with each scrape: each endpoint's measured J/token is what "
        "the proxy learns eps from")
    energy_metrics_port: int = Field(
        NODE_AGENT_METRICS_PORT, ge=0, le=65535, description="with --cluster: also read the "
        "ready node agents' pages (pods labelled app.kubernetes.io/component=node-agent in "
        "the namespace) on this port (0: only --energy-metrics-urls)")

    @field_validator("routing")
    @classmethod
    def _known_routing(cls, value: str) -> str:
        routing_profile(value)  # ValueError naming the choices
        return value

    @field_validator("energy_metrics_urls")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        """Each an absolute ``http(s)://host[:port]/path`` URL (anything else could only
        ever count as a failed scrape)."""
        for url in value:
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 - ValueError when the port is not a number
            except ValueError as exc:
                raise ValueError(f"{url!r}: not a URL ({exc})") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r}: not an http(s)://host/... URL")
        return value

    def router_settings(self) -> RouterSettings:
        return dataclasses.replace(
            super().router_settings(), routing=self.routing,
            energy_urls=tuple(self.energy_metrics_urls),
            energy_port=self.energy_metrics_port if self.cluster else 0,
            energy_namespace=self.plan_namespace() if self.cluster else None,
            clocks_follow_load=self.clocks_follow_load)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (see :mod:`joulepool.settings`)."""
    settings_base.add_arguments(parser, Settings)


def load_settings(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge the layers and validate; errors name the flag, variable or file key."""
    return settings_base.load(Settings, args, environ)
