"""``joulepool operator``: run the kopf operator, or print its RBAC (``joulepool operator rbac``).

Its flags and their environment variables (the Helm chart sets these) are
:class:`joulepool.operator.settings.OperatorSettings`; ``joulepool operator --help``
lists them.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from joulepool.operator.settings import OperatorSettings


def configure(parser: argparse.ArgumentParser) -> None:
    from joulepool.operator.settings import OperatorSettings
    from joulepool.settings import add_arguments

    add_arguments(parser, OperatorSettings)
    sub = parser.add_subparsers(dest="operator_command", metavar="SUBCOMMAND")
    rbac = sub.add_parser("rbac", help="print the RBAC objects the operator needs (YAML)")
    rbac.add_argument("--service-account", default="joulepool-operator")
    rbac.add_argument("--name", default="joulepool-operator",
                      help="name of the ClusterRole/Role and their bindings")


def load_operator_settings(args: argparse.Namespace) -> OperatorSettings:
    """Flags > env > ``--config`` file > defaults; a bad value is a usage error naming it."""
    from joulepool.cli import UsageError
    from joulepool.operator.settings import OperatorSettings
    from joulepool.settings import SettingsError, load

    try:
        return load(OperatorSettings, args)
    except SettingsError as exc:
        raise UsageError(str(exc)) from None


def config_from_args(args: argparse.Namespace) -> object:
    """The operator's configuration (an ``OperatorConfig``) from its settings."""
    from joulepool.operator.config import OperatorConfig, PickerRef, default_namespace

    settings = load_operator_settings(args)
    namespace = settings.namespace or default_namespace()
    picker = PickerRef(settings.epp_service, namespace, settings.epp_port,
                       settings.epp_failure_mode) if settings.epp_service else None
    return OperatorConfig(
        namespace=namespace,
        picker=picker,
        watch_namespaces=tuple(settings.watch_namespace),
        scheduler_name=settings.scheduler_name,
        debounce_seconds=settings.debounce_seconds,
        max_delay_seconds=max(10.0, 10 * settings.debounce_seconds),
        liveness_port=settings.liveness or None,
        metrics_port=settings.metrics_port or None,
        metrics_address=settings.metrics_address,
        liveness_address=settings.liveness_address,
    )


def run(args: argparse.Namespace) -> int:
    if getattr(args, "operator_command", None) == "rbac":
        from joulepool.operator.config import default_namespace
        from joulepool.operator.rbac import rbac_manifest

        print(rbac_manifest(args.namespace or default_namespace(), args.service_account,
                            args.name), end="")
        return 0

    import asyncio
    import logging

    from joulepool.operator.app import Operator
    from joulepool.operator.config import OperatorConfig

    config = config_from_args(args)
    assert isinstance(config, OperatorConfig)
    if load_operator_settings(args).verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    else:
        logging.getLogger("joulepool").setLevel(
            min(logging.getLogger().getEffectiveLevel(), logging.INFO))
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    import sys

    import kopf

    operator = Operator(config)
    if config.metrics_port:
        from joulepool.operator.metrics import serve

        serve(operator.planner.metrics, config.metrics_address, config.metrics_port)
    try:
        asyncio.run(operator.run())
    except KeyboardInterrupt:
        return 130
    except kopf.LoginError as exc:
        print(f"joulepool operator: error: cannot log in to Kubernetes: {exc}", file=sys.stderr)
        return 1
    return 0
