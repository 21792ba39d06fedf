"""``joulepool operator``: run the kopf operator, or print its RBAC (``joulepool operator rbac``).

Flags and their environment variables (the Helm chart sets these):

==========================  =========================  =====================================
flag                        env                        default
==========================  =========================  =====================================
``--namespace``             ``POD_NAMESPACE``          the service account's namespace,
                                                       else ``joulepool-system``
``--watch-namespace`` (rep.) ``WATCH_NAMESPACE`` (a,b)  all namespaces (cluster-wide)
``--scheduler-name``        ``JOULEPOOL_SCHEDULER``    ``joulepool-scheduler``
``--debounce-seconds``      ``JOULEPOOL_DEBOUNCE``     ``1.0``
``--liveness``              ``JOULEPOOL_LIVENESS``     ``8080`` (``/healthz``; 0 disables)
``--verbose``                                          off
==========================  =========================  =====================================
"""

from __future__ import annotations

import argparse
import os


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace", default=None,
        help="namespace of the plan ConfigMap joulepool-plan (env POD_NAMESPACE; default: "
             "the service account's namespace, else joulepool-system)")
    parser.add_argument(
        "--watch-namespace", action="append", default=None, metavar="NS",
        help="serve InferencePools only in NS (repeatable, or comma-separated; env "
             "WATCH_NAMESPACE); default: all namespaces")
    parser.add_argument(
        "--scheduler-name", default=os.environ.get("JOULEPOOL_SCHEDULER", "joulepool-scheduler"),
        help="schedulerName of the serving pods (default joulepool-scheduler)")
    parser.add_argument(
        "--debounce-seconds", type=float, default=_env_float("JOULEPOOL_DEBOUNCE", 1.0),
        help="quiet time after the last change before the joint plan runs (default 1.0)")
    parser.add_argument(
        "--liveness", type=int, default=int(os.environ.get("JOULEPOOL_LIVENESS", "8080")),
        metavar="PORT", help="port of the liveness endpoint /healthz (default 8080; 0: none)")
    parser.add_argument("--verbose", action="store_true", help="log every handler and request")
    sub = parser.add_subparsers(dest="operator_command", metavar="SUBCOMMAND")
    rbac = sub.add_parser("rbac", help="print the RBAC objects the operator needs (YAML)")
    rbac.add_argument("--service-account", default="joulepool-operator")
    rbac.add_argument("--name", default="joulepool-operator",
                      help="name of the ClusterRole/Role and their bindings")


def config_from_args(args: argparse.Namespace) -> object:
    from joulepool.cli import UsageError
    from joulepool.operator.config import OperatorConfig, default_namespace

    watch: list[str] = []
    for item in args.watch_namespace or [os.environ.get("WATCH_NAMESPACE", "")]:
        watch.extend(ns.strip() for ns in item.split(",") if ns.strip())
    if args.debounce_seconds < 0:
        raise UsageError("--debounce-seconds must be >= 0")
    if not 0 <= args.liveness <= 65535:
        raise UsageError("--liveness must be a port number (0 disables it)")
    return OperatorConfig(
        namespace=args.namespace or default_namespace(),
        watch_namespaces=tuple(dict.fromkeys(watch)),
        scheduler_name=args.scheduler_name,
        debounce_seconds=args.debounce_seconds,
        max_delay_seconds=max(10.0, 10 * args.debounce_seconds),
        liveness_port=args.liveness or None,
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
    if args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    else:
        logging.getLogger("joulepool").setLevel(
            min(logging.getLogger().getEffectiveLevel(), logging.INFO))
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    import sys

    import kopf

    operator = Operator(config)
    try:
        asyncio.run(operator.run())
    except KeyboardInterrupt:
        return 130
    except kopf.LoginError as exc:
        print(f"joulepool operator: error: cannot log in to Kubernetes: {exc}", file=sys.stderr)
        return 1
    return 0
