"""Settings of ``joulepool extender``: flags > environment > ``--config`` YAML > defaults.

The layering is :mod:`joulepool.settings`, shared by every component.

Every setting ``foo_bar`` is
  * the flag ``--foo-bar`` (booleans also ``--no-foo-bar``),
  * the environment variable ``JOULEPOOL_EXTENDER_FOO_BAR``,
  * the key ``foo-bar`` (or ``foo_bar``) of the ``--config`` YAML mapping.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from joulepool import settings as settings_base
from joulepool.api.contract import EXTENDER_PORT as DEFAULT_PORT
from joulepool.api.contract import EXTENDER_PREFIX as DEFAULT_PREFIX
from joulepool.extender import freshness
from joulepool.kube.settings import ServiceSettings
from joulepool.settings import SettingsError

__all__ = ["Settings", "SettingsError", "add_arguments", "load_settings"]


class Settings(ServiceSettings):
    """Settings of the kube-scheduler extender (the shared ones: :class:`ServiceSettings`)."""

    ENV_PREFIX: ClassVar[str] = "JOULEPOOL_EXTENDER_"
    STRICT_ENV: ClassVar[bool] = True
    CONFIG_ENV: ClassVar[str] = "JOULEPOOL_EXTENDER_CONFIG"

    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="port to listen on (0: any)")
    prefix: str = Field(DEFAULT_PREFIX, description="URL prefix of the scheduler verbs")
    token_scope: Literal["all", "router"] = Field(
        "all", description="paths the token guards: all, or router (/metrics, /debug: all "
        "but the scheduler verbs) -- kube-scheduler cannot send tokens, so use 'router' "
        "(and TLS) with it",
    )
    max_nodes: int = Field(20000, ge=1, description="most candidate nodes per call (413 above)")

    # -- placement ----------------------------------------------------------------------------
    placement_lambda: float = Field(
        1e4, ge=0, description="placement cost of utilisation above the ceiling (W per unit)"
    )
    max_utilisation: float = Field(0.9, gt=0, le=1, description="node utilisation ceiling")
    reserve_placements: bool = Field(
        True, description="filter sends a pool pod to one node and reserves its GPUs there "
        "until the binding shows in the watch, so a plan's per-node share holds while "
        "kube-scheduler binds asynchronously (--no-reserve-placements: every passing node)",
    )
    fresh_read_timeout_seconds: float = Field(
        freshness.DEFAULT_TIMEOUT_S, ge=0, le=60, description="when filter finds every "
        "candidate full while the pod watch counts pods there, re-read those nodes' pods "
        "from the API server (at most this long, s; within kube-scheduler's extender "
        "httpTimeout) and decide again: the watch may not have delivered a deletion yet "
        "(0: never)",
    )
    fresh_read_max_nodes: int = Field(
        freshness.DEFAULT_MAX_NODES, ge=1, le=1000,
        description="most nodes one filter call re-reads (the first candidates)",
    )
    fresh_read_min_interval_seconds: float = Field(
        freshness.DEFAULT_MIN_INTERVAL_S, ge=0, le=3600, description="the same pod's "
        "question about the same node is re-read at most once per this many seconds "
        "(kube-scheduler retries a refused pod with backoff anyway)",
    )
    fresh_reads_per_second: float = Field(
        freshness.DEFAULT_READS_PER_SECOND, gt=0, le=10000, description="re-reads in all, "
        "per second (a token bucket of as many): a cluster that is really full costs the "
        "API server at most this",
    )
    replica_utilisation: float = Field(
        0.9, gt=0, le=1, description="load a replica carries, as a share of its capacity"
    )
    queue_horizon_seconds: float = Field(
        10.0, gt=0, description="queued tokens on a node count as load draining in this time"
    )

    @model_validator(mode="after")
    def _prefix(self) -> Settings:
        if self.prefix and (not self.prefix.startswith("/") or self.prefix.endswith("/")):
            raise ValueError("prefix must start with '/' and not end with '/'")
        return self


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (see :mod:`joulepool.settings`)."""
    settings_base.add_arguments(parser, Settings)


def load_settings(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge the layers and validate; errors name the flag, variable or file key."""
    return settings_base.load(Settings, args, environ)
