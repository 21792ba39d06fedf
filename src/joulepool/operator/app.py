"""Assemble and run the operator: kopf settings, registry, planner, client."""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any

import kopf

from joulepool.api.contract import FINALIZER
from joulepool.operator import events, handlers
from joulepool.operator.config import ANNOTATION_PREFIX, OperatorConfig
from joulepool.operator.kube import KubeClient
from joulepool.operator.planning import Planner


def make_settings(config: OperatorConfig) -> kopf.OperatorSettings:
    """kopf settings: standalone, no CRD/namespace scanning, state in our annotations."""
    settings = kopf.OperatorSettings()
    # One replica by design (see the package docstring): no peering objects, no RBAC for them.
    settings.peering.standalone = True
    # Resources are discovered once at start-up through API discovery (no RBAC needed);
    # watching CRDs and listing namespaces would need cluster-wide read access to both.
    settings.scanning.disabled = True
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    # Events only for what a user must see (invalid specs, failures), not every handler run:
    # kopf.warn and kopf's own reports of failing handlers ("Handler 'pool_deleted' failed
    # temporarily: ..."), which kopf >= 1.4x posts only with posting.loggers. They are about
    # InferencePools, next to the pool; kopf posts nothing about cluster-scoped objects here
    # (their handlers are on.event and indexes, whose failures kopf only logs), and has no
    # setting for where such events go: joulepool.operator.events posts those itself.
    settings.posting.level = logging.WARNING
    settings.posting.loggers = True
    settings.posting.reporting_component = events.COMPONENT
    settings.watching.server_timeout = config.watch_server_timeout
    settings.watching.client_timeout = config.watch_client_timeout
    settings.watching.reconnect_backoff = 1.0
    settings.networking.request_timeout = config.request_timeout
    return settings


def liveness_endpoint(address: str, port: int) -> str:
    """kopf's liveness URL for ``address`` (IPv6 literals bracketed) and ``port``."""
    host = f"[{address}]" if ":" in address and not address.startswith("[") else address
    return f"http://{host}:{port}/healthz"


class Operator:
    """One operator instance: planner + kopf registry + settings, runnable in any loop."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.client = KubeClient(retry_delays=config.retry_delays,
                                 request_timeout=config.request_timeout,
                                 relogin=self._relogin)
        self.planner = Planner(config, self.client)
        self.memo = handlers.OperatorMemo(planner=self.planner, config=config)
        self.registry = handlers.registry
        self.settings = make_settings(config)

    async def _relogin(self) -> kopf.ConnectionInfo | None:
        return await self.memo.relogin()

    def run(self, stop_flag: Any = None, ready_flag: Any = None) -> Coroutine[Any, Any, None]:
        """The operator as a coroutine; ``stop_flag``/``ready_flag``: asyncio or threading
        Events (or futures), as ``kopf.operator`` accepts."""
        namespaces = list(self.config.watch_namespaces)
        kwargs: dict[str, Any] = {}
        if self.config.liveness_port is not None:
            kwargs["liveness_endpoint"] = liveness_endpoint(self.config.liveness_address,
                                                            self.config.liveness_port)
        return kopf.operator(
            registry=self.registry,
            settings=self.settings,
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            memo=self.memo,
            **kwargs,
        )
