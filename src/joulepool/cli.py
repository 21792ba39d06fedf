"""``joulepool <command>``: one entry point for every component.

Each command lives in its own package and exposes ``configure(parser)`` and
``run(args) -> int`` from a light ``cli`` module (no heavy imports at module
level), so ``joulepool --help`` stays fast and one broken component cannot
take the others down.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from joulepool import __version__

#: command -> (module with configure/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("joulepool.plan_cli", "plan InferencePools on a cluster and print the plan"),
    "crds": ("joulepool.api.cli", "write the CRD YAML generated from the pydantic models"),
    "simulate": ("joulepool.sim.cli", "replay a trace on a simulated cluster, compare policies"),
    "operator": ("joulepool.operator.cli", "run the kopf operator that plans InferencePools"),
    "extender": ("joulepool.extender.cli", "run the kube-scheduler extender"),
    "router": ("joulepool.router.cli", "run the request router (picks an endpoint per request)"),
    "node-agent": ("joulepool.nodeagent.cli", "run the node agent: MIAD clock control and energy"),
    "sidecar": ("joulepool.nodeagent.cli", "alias of node-agent (the name of earlier releases)"),
    "device-plugin": ("joulepool.fakes.deviceplugin_cli", "run the fake GPU kubelet device plugin"),
    "fake-engine": ("joulepool.fakes.engine_cli", "run a stand-in vLLM server on a fake GPU"),
    "bench": ("joulepool.bench", "run the benchmarks in benchmarks/"),
}

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="joulepool",
        description="Energy- and carbon-aware LLM inference pools on heterogeneous GPU clusters.",
    )
    parser.add_argument("--version", action="version", version=f"joulepool {__version__}")
    parser.add_argument(
        "--log-level", default="WARNING", help="logging level (default WARNING: quiet)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # component not installed in this build
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format='{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}',
    )
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"joulepool {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # `python -m joulepool.cli` loads this file as __main__; call the installed module's
    # main so UsageError is the same class the commands raise.
    from joulepool.cli import main as _main

    sys.exit(_main())
