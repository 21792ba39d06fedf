"""``joulepool node-agent`` (alias ``sidecar``): the node agent (light module: heavy imports
inside ``run``). Its settings are :class:`joulepool.nodeagent.settings.NodeAgentSettings`."""

from __future__ import annotations

import argparse
import os
import socket


def _node_default() -> str:
    return os.environ.get("JOULEPOOL_NODE") or os.environ.get("NODE_NAME") or socket.gethostname()


def configure(parser: argparse.ArgumentParser) -> None:
    from joulepool.nodeagent.settings import NodeAgentSettings
    from joulepool.settings import add_arguments

    parser.description = (
        "Node agent: per-GPU MIAD clock control from the local engines' SLO signals, energy "
        "metering and online J/token estimates. Resets locked clocks on start, on SIGTERM/SIGINT "
        "and after control errors; runs monitor-only without CAP_SYS_ADMIN."
    )
    add_arguments(parser, NodeAgentSettings)


def run(args: argparse.Namespace) -> int:
    from joulepool.cli import UsageError
    from joulepool.nodeagent.runner import run_sidecar
    from joulepool.nodeagent.settings import NodeAgentSettings
    from joulepool.settings import SettingsError, load

    try:
        settings = load(NodeAgentSettings, args)
    except SettingsError as exc:
        raise UsageError(str(exc)) from None
    if settings.hold and not settings.reset_and_exit:
        from joulepool.nodeagent.uninstall import hold

        return hold()
    if settings.await_pods_gone or settings.await_daemonset:
        from joulepool.nodeagent.uninstall import run_await

        return run_await(settings)
    return run_sidecar(settings)
